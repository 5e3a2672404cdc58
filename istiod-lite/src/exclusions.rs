//! Ports a pod keeps out of capture, from its annotations.
//!
//! * `ambit.dev/exclude-ports`: both directions.
//! * Istio's `traffic.sidecar.istio.io/excludeInboundPorts` and
//!   `traffic.sidecar.istio.io/excludeOutboundPorts`, honoured as Istio does.
//!
//! Values are comma-separated port numbers; whitespace is ignored. `*` is not
//! accepted: a pod that wants no capture opts out with
//! `istio.io/dataplane-mode=none` instead.

use std::collections::BTreeSet;

pub const AMBIT_EXCLUDE_PORTS: &str = "ambit.dev/exclude-ports";
pub const ISTIO_EXCLUDE_INBOUND: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const ISTIO_EXCLUDE_OUTBOUND: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExcludedPorts {
    pub inbound: BTreeSet<u16>,
    pub outbound: BTreeSet<u16>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("annotation {annotation}: {value:?} is not a port number (1-65535)")]
pub struct BadPort {
    pub annotation: &'static str,
    pub value: String,
}

impl ExcludedPorts {
    /// Reads the exclusions from a pod's annotations.
    pub fn from_annotations<'a>(
        annotations: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, BadPort> {
        let mut out = ExcludedPorts::default();
        for (key, value) in annotations {
            let (name, inbound, outbound) = match key {
                AMBIT_EXCLUDE_PORTS => (AMBIT_EXCLUDE_PORTS, true, true),
                ISTIO_EXCLUDE_INBOUND => (ISTIO_EXCLUDE_INBOUND, true, false),
                ISTIO_EXCLUDE_OUTBOUND => (ISTIO_EXCLUDE_OUTBOUND, false, true),
                _ => continue,
            };
            for port in parse_ports(name, value)? {
                if inbound {
                    out.inbound.insert(port);
                }
                if outbound {
                    out.outbound.insert(port);
                }
            }
        }
        Ok(out)
    }
}

fn parse_ports(annotation: &'static str, value: &str) -> Result<Vec<u16>, BadPort> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| BadPort {
                    annotation,
                    value: p.to_string(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_ambit_and_istio_annotations() {
        let got = ExcludedPorts::from_annotations([
            (AMBIT_EXCLUDE_PORTS, "22, 3306"),
            (ISTIO_EXCLUDE_INBOUND, "8081"),
            (ISTIO_EXCLUDE_OUTBOUND, "53,"),
            ("unrelated", "x"),
        ])
        .unwrap();
        assert_eq!(
            got.inbound.iter().copied().collect::<Vec<_>>(),
            [22, 3306, 8081]
        );
        assert_eq!(
            got.outbound.iter().copied().collect::<Vec<_>>(),
            [22, 53, 3306]
        );
    }

    #[test]
    fn rejects_bad_ports_with_the_annotation_name() {
        for bad in ["0", "70000", "*", "http"] {
            let err = ExcludedPorts::from_annotations([(ISTIO_EXCLUDE_INBOUND, bad)]).unwrap_err();
            assert_eq!(err.annotation, ISTIO_EXCLUDE_INBOUND);
            assert!(err.to_string().contains(bad));
        }
    }
}
