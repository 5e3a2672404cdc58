//! The delta-client [`Handler`] every Ambit proxy uses: each resource is
//! decoded (and so validated) on arrival, and the whole accepted set is
//! assembled into one validated [`MeshConfig`] that is handed to a
//! [`MeshSink`]. ztunnel and the waypoint differ only in the types they
//! subscribe to ([`ZTUNNEL_TYPES`], [`WAYPOINT_TYPES`]) and in their sink.
//!
//! ```ignore
//! let client = Client::new(cp, format!("waypoint~{node}"), &node, &WAYPOINT_TYPES);
//! let handler = MeshHandler::new(trust_domain, Some(&node), move |config: MeshConfig| {
//!     routes.store(Arc::new(config));
//!     Ok(())
//! });
//! client.run(handler).await;
//! ```

use std::panic::{catch_unwind, AssertUnwindSafe};

use prost_types::Any;

use super::client::{Handler, ResourceSet};
use super::l7::{decode_http_policy, decode_http_route, decode_traffic_policy, L7Config};
use super::resources::{assemble_with_l7, decode_address, decode_authorization};
use crate::config::MeshConfig;
use crate::proto::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE, HTTP_AUTHORIZATION_TYPE, HTTP_ROUTE_TYPE, TRAFFIC_POLICY_TYPE,
};

/// What ztunnel subscribes to, in order: policies before the addresses
/// naming them.
pub const ZTUNNEL_TYPES: [&str; 2] = [AUTHORIZATION_TYPE, ADDRESS_TYPE];

/// What a waypoint subscribes to, in order: the policies first, so that a
/// first sync never holds routes without the policies that restrict them,
/// and routes last, once the Services they send to are known.
pub const WAYPOINT_TYPES: [&str; 5] = [
    HTTP_AUTHORIZATION_TYPE,
    TRAFFIC_POLICY_TYPE,
    AUTHORIZATION_TYPE,
    ADDRESS_TYPE,
    HTTP_ROUTE_TYPE,
];

/// Istio's root namespace, where istiod-lite puts mesh-wide policies.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// What a proxy does with each config assembled from the stream.
pub trait MeshSink: Send + 'static {
    /// Takes a config that assembled and validated. An error NACKs the
    /// response, which is then undone.
    fn apply(&mut self, config: MeshConfig) -> Result<(), String>;

    /// The accepted set did not assemble into a valid config (or assembling
    /// or applying panicked): the response is NACKed and undone, and the
    /// previous config stays in force. For counting; `error` is also logged
    /// by the client.
    fn rejected(&mut self, _error: &str) {}
}

impl<F> MeshSink for F
where
    F: FnMut(MeshConfig) -> Result<(), String> + Send + 'static,
{
    fn apply(&mut self, config: MeshConfig) -> Result<(), String> {
        self(config)
    }
}

/// A [`Handler`] that turns the resources of [`ZTUNNEL_TYPES`] and
/// [`WAYPOINT_TYPES`] into a validated [`MeshConfig`].
pub struct MeshHandler<S> {
    trust_domain: String,
    root_namespace: String,
    local_node: Option<String>,
    sink: S,
}

impl<S: MeshSink> MeshHandler<S> {
    /// `local_node` is the node the proxy runs on: its workloads are denied
    /// everything while a selector policy they name is missing (see
    /// [`super::assemble`]).
    pub fn new(trust_domain: &str, local_node: Option<&str>, sink: S) -> Self {
        MeshHandler {
            trust_domain: trust_domain.to_string(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            local_node: local_node.map(str::to_string),
            sink,
        }
    }

    /// For a control plane whose root namespace is not `istio-system`.
    pub fn with_root_namespace(mut self, root_namespace: &str) -> Self {
        self.root_namespace = root_namespace.to_string();
        self
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }
}

/// Checks one resource as the client receives it. L7 resources must be named
/// `<namespace>/<name>` after their content: two names carrying the same
/// object would otherwise only fail later, when the whole set is assembled.
pub fn check_resource(
    type_url: &str,
    name: &str,
    resource: &Any,
    trust_domain: &str,
) -> Result<(), String> {
    let key = match type_url {
        ADDRESS_TYPE => return decode_address(resource, trust_domain).map(drop),
        AUTHORIZATION_TYPE => return decode_authorization(resource).map(drop),
        HTTP_ROUTE_TYPE => decode_http_route(resource)?.key(),
        HTTP_AUTHORIZATION_TYPE => decode_http_policy(resource)?.key(),
        TRAFFIC_POLICY_TYPE => decode_traffic_policy(resource)?.key(),
        other => return Err(format!("unexpected type {other}")),
    };
    if key != name {
        return Err(format!("resource named {name:?} holds {key:?}"));
    }
    Ok(())
}

/// Assembles everything accepted so far into one validated config. Types not
/// subscribed to are simply empty.
pub fn build_mesh_config(
    resources: &ResourceSet,
    trust_domain: &str,
    root_namespace: &str,
    local_node: Option<&str>,
) -> Result<MeshConfig, String> {
    let of = |type_url: &str| resources.get(type_url).into_iter().flat_map(|m| m.iter());
    let mut addresses = Vec::new();
    for (_, stored) in of(ADDRESS_TYPE) {
        addresses.push(decode_address(&stored.resource, trust_domain)?);
    }
    let mut policies = Vec::new();
    for (name, stored) in of(AUTHORIZATION_TYPE) {
        let (policy, notes) = decode_authorization(&stored.resource)?;
        for n in notes {
            tracing::warn!(policy = %name, "narrowed to fail closed: {n}");
        }
        policies.push(policy);
    }
    let mut l7 = L7Config::default();
    for (_, stored) in of(HTTP_ROUTE_TYPE) {
        l7.http_routes.push(decode_http_route(&stored.resource)?);
    }
    for (_, stored) in of(HTTP_AUTHORIZATION_TYPE) {
        l7.http_policies.push(decode_http_policy(&stored.resource)?);
    }
    for (_, stored) in of(TRAFFIC_POLICY_TYPE) {
        l7.traffic_policies
            .push(decode_traffic_policy(&stored.resource)?);
    }
    assemble_with_l7(
        trust_domain,
        root_namespace,
        local_node,
        addresses,
        policies,
        l7,
    )
}

impl<S: MeshSink> Handler for MeshHandler<S> {
    fn check(&mut self, type_url: &str, name: &str, resource: &Any) -> Result<(), String> {
        check_resource(type_url, name, resource, &self.trust_domain)
    }

    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String> {
        // A panic here would kill the client task and leave the proxy on its
        // last config with no stream at all; as an error it is a NACK.
        let built = catch_unwind(AssertUnwindSafe(|| {
            build_mesh_config(
                resources,
                &self.trust_domain,
                &self.root_namespace,
                self.local_node.as_deref(),
            )
        }))
        .unwrap_or_else(|_| Err("internal error while assembling (bug); update ignored".into()));
        let config = match built {
            Ok(c) => c,
            Err(e) => {
                self.sink.rejected(&e);
                return Err(e);
            }
        };
        let sink = &mut self.sink;
        match catch_unwind(AssertUnwindSafe(|| sink.apply(config))) {
            Ok(outcome) => outcome,
            Err(_) => {
                let e = "internal error while applying (bug); update ignored".to_string();
                self.sink.rejected(&e);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::config::parse_mesh_config;
    use crate::xds::client::Stored;
    use crate::xds::{encode, encode_l7, NamedResource};

    const MESH: &str = r#"
workloads:
- {name: wp-0, namespace: demo, node: n1, addresses: [198.19.1.9], services: [demo/wp], nativeTunnel: true}
- {name: app, namespace: demo, node: n2, addresses: [198.19.2.2], services: [demo/app]}
services:
- {name: wp, namespace: demo, addresses: [198.18.0.9], ports: [{port: 15008}]}
- {name: app, namespace: demo, addresses: [198.18.0.2], ports: [{port: 80}], waypoint: {namespace: demo, name: wp}}
httpRoutes:
- name: app
  namespace: demo
  parents: [{kind: Service, namespace: demo, name: app}]
  rules: [{backendRefs: [{name: app, port: 80}]}]
httpPolicies:
- {name: only-get, namespace: demo, targets: [{kind: Service, name: app}], action: Allow, rules: [{to: [{methods: [GET]}]}]}
trafficPolicies:
- {name: cb, namespace: demo, target: {kind: Service, name: app}, connectionPool: {maxRequests: 10}}
"#;

    fn set(type_url: &str, list: Vec<NamedResource>, into: &mut ResourceSet) {
        let m = into.entry(type_url.to_string()).or_default();
        for r in list {
            m.insert(
                r.name,
                Stored {
                    version: "1".into(),
                    resource: r.resource,
                },
            );
        }
    }

    fn resources(types: &[&str]) -> ResourceSet {
        let config = parse_mesh_config(MESH).unwrap();
        let (l4, l7) = (encode(&config), encode_l7(&config));
        let mut out = ResourceSet::new();
        for (t, list) in [
            (ADDRESS_TYPE, l4.addresses),
            (AUTHORIZATION_TYPE, l4.authorizations),
            (HTTP_ROUTE_TYPE, l7.http_routes),
            (HTTP_AUTHORIZATION_TYPE, l7.http_policies),
            (TRAFFIC_POLICY_TYPE, l7.traffic_policies),
        ] {
            if types.contains(&t) {
                set(t, list, &mut out);
            }
        }
        out
    }

    #[test]
    fn a_waypoint_gets_the_l7_sections_and_ztunnel_does_not() {
        let got: Arc<Mutex<Vec<MeshConfig>>> = Arc::default();
        let sink = {
            let got = got.clone();
            move |c: MeshConfig| {
                got.lock().unwrap().push(c);
                Ok(())
            }
        };
        let mut h = MeshHandler::new("cluster.local", Some("n1"), sink);
        h.apply(&resources(&WAYPOINT_TYPES)).unwrap();
        let c = got.lock().unwrap().pop().unwrap();
        assert_eq!(c.workloads.len(), 2);
        assert_eq!(c.http_routes[0].key(), "demo/app");
        assert_eq!(c.http_policies[0].key(), "demo/only-get");
        assert_eq!(c.traffic_policies[0].key(), "demo/cb");

        let c = build_mesh_config(
            &resources(&ZTUNNEL_TYPES),
            "cluster.local",
            DEFAULT_ROOT_NAMESPACE,
            Some("n2"),
        )
        .unwrap();
        assert_eq!(c.workloads.len(), 2);
        assert!(c.http_routes.is_empty() && c.http_policies.is_empty());
        assert!(c.traffic_policies.is_empty());
    }

    #[test]
    fn the_root_namespace_is_the_control_planes() {
        let got: Arc<Mutex<Vec<MeshConfig>>> = Arc::default();
        let sink = {
            let got = got.clone();
            move |c: MeshConfig| {
                got.lock().unwrap().push(c);
                Ok(())
            }
        };
        let mut h =
            MeshHandler::new("cluster.local", Some("n1"), sink).with_root_namespace("mesh-root");
        h.apply(&resources(&ZTUNNEL_TYPES)).unwrap();
        let c = got.lock().unwrap().pop().unwrap();
        assert_eq!(c.root_namespace, "mesh-root");
    }

    #[test]
    fn resources_are_checked_on_arrival() {
        let all = resources(&WAYPOINT_TYPES);
        let route = &all[HTTP_ROUTE_TYPE]["demo/app"].resource;
        assert!(check_resource(HTTP_ROUTE_TYPE, "demo/app", route, "cluster.local").is_ok());
        let err = check_resource(HTTP_ROUTE_TYPE, "demo/other", route, "cluster.local");
        assert!(err.unwrap_err().contains("holds \"demo/app\""));
        // A route body under the policy type is refused, not misread.
        assert!(
            check_resource(HTTP_AUTHORIZATION_TYPE, "demo/app", route, "cluster.local").is_err()
        );
        let garbage = Any {
            type_url: TRAFFIC_POLICY_TYPE.into(),
            value: vec![0x0a, 0xff, 0xff, 0xff],
        };
        assert!(check_resource(TRAFFIC_POLICY_TYPE, "demo/cb", &garbage, "cluster.local").is_err());
        assert!(
            check_resource("type.googleapis.com/nope", "x", &garbage, "cluster.local").is_err()
        );
    }

    struct Counting {
        rejected: Arc<Mutex<Vec<String>>>,
    }

    impl MeshSink for Counting {
        fn apply(&mut self, _: MeshConfig) -> Result<(), String> {
            Ok(())
        }
        fn rejected(&mut self, error: &str) {
            self.rejected.lock().unwrap().push(error.to_string());
        }
    }

    #[test]
    fn a_set_that_does_not_assemble_is_rejected_and_counted() {
        let rejected: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut h = MeshHandler::new(
            "cluster.local",
            Some("n1"),
            Counting {
                rejected: rejected.clone(),
            },
        );
        let mut all = resources(&WAYPOINT_TYPES);
        // Two names carrying the same route: each is fine alone, not together.
        let route = all[HTTP_ROUTE_TYPE]["demo/app"].clone();
        all.entry(HTTP_ROUTE_TYPE.to_string())
            .or_default()
            .insert("demo/app-copy".into(), route);
        assert!(h.apply(&all).is_err());
        assert_eq!(rejected.lock().unwrap().len(), 1);
    }
}
