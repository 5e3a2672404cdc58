//! Versioned, immutable views of everything istiod-lite serves.
//!
//! Each snapshot remembers which names changed since the one before it, so a
//! client that is one version behind is brought up to date by looking at the
//! changed names only: a pod change costs O(1) per client, not O(mesh).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use mesh_core::proto::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE, HTTP_AUTHORIZATION_TYPE, HTTP_ROUTE_TYPE, TRAFFIC_POLICY_TYPE,
};
use mesh_core::xds::{EncodedConfig, EncodedL7, NamedResource};
use prost_types::Any;

use super::visibility::Visibility;

/// The types served, in push order: policies before the addresses that name
/// them, so a client never sees a workload whose policy it lacks; L7
/// policies first and routes last, so a waypoint never holds a route (which
/// lets requests through) without the policies that restrict it, and knows
/// the Services a route sends to when it gets it.
pub const TYPES: [&str; 5] = [
    HTTP_AUTHORIZATION_TYPE,
    TRAFFIC_POLICY_TYPE,
    AUTHORIZATION_TYPE,
    ADDRESS_TYPE,
    HTTP_ROUTE_TYPE,
];

#[derive(Debug)]
pub struct Entry {
    /// A content hash: equal bytes give an equal version across restarts.
    pub version: String,
    pub resource: Any,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub resources: HashMap<&'static str, BTreeMap<String, Arc<Entry>>>,
    /// Names added, updated or removed since `version - 1`, per type.
    pub changed: HashMap<&'static str, Vec<String>>,
    /// Which node is sent which authorization and L7 resource.
    pub visibility: Arc<Visibility>,
}

fn content_version(any: &Any) -> String {
    // Fixed keys: equal bytes give an equal version, also after a restart of
    // the same build, so reconnecting clients resume without a resend.
    let mut h = std::hash::DefaultHasher::new();
    any.type_url.hash(&mut h);
    any.value.hash(&mut h);
    format!("{:016x}", h.finish())
}

impl Snapshot {
    /// The snapshot after `self` holding `encoded` and no L7 resources, or
    /// `None` when nothing changed.
    pub fn next(&self, encoded: EncodedConfig) -> Option<Snapshot> {
        self.next_with_l7(encoded, EncodedL7::default())
    }

    /// The snapshot after `self` holding `encoded` and `l7`, or `None` when
    /// nothing changed.
    pub fn next_with_l7(&self, encoded: EncodedConfig, l7: EncodedL7) -> Option<Snapshot> {
        let mut resources = HashMap::new();
        let mut changed = HashMap::new();
        let mut any_change = false;
        for (type_url, list) in [
            (HTTP_AUTHORIZATION_TYPE, l7.http_policies),
            (TRAFFIC_POLICY_TYPE, l7.traffic_policies),
            (AUTHORIZATION_TYPE, encoded.authorizations),
            (ADDRESS_TYPE, encoded.addresses),
            (HTTP_ROUTE_TYPE, l7.http_routes),
        ] {
            let old = self.resources.get(type_url);
            let mut map = BTreeMap::new();
            let mut names = Vec::new();
            for NamedResource { name, resource } in list {
                let version = content_version(&resource);
                match old.and_then(|o| o.get(&name)) {
                    Some(e) if e.version == version => {
                        map.insert(name, e.clone());
                    }
                    _ => {
                        names.push(name.clone());
                        map.insert(name, Arc::new(Entry { version, resource }));
                    }
                }
            }
            if let Some(old) = old {
                names.extend(old.keys().filter(|n| !map.contains_key(*n)).cloned());
            }
            any_change |= !names.is_empty();
            resources.insert(type_url, map);
            changed.insert(type_url, names);
        }
        (any_change || self.version == 0).then(|| Snapshot {
            version: self.version + 1,
            resources,
            changed,
            visibility: Arc::default(),
        })
    }

    pub fn with_visibility(mut self, visibility: Visibility) -> Self {
        self.visibility = Arc::new(visibility);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(name: &str, body: &[u8]) -> NamedResource {
        NamedResource {
            name: name.into(),
            resource: Any {
                type_url: ADDRESS_TYPE.into(),
                value: body.to_vec(),
            },
        }
    }

    #[test]
    fn changes_are_tracked_by_name() {
        let s0 = Snapshot::default();
        let s1 = s0
            .next(EncodedConfig {
                addresses: vec![res("a", b"1"), res("b", b"2")],
                authorizations: vec![],
            })
            .unwrap();
        assert_eq!(s1.version, 1);
        assert_eq!(s1.changed[ADDRESS_TYPE], vec!["a", "b"]);
        let same = EncodedConfig {
            addresses: vec![res("a", b"1"), res("b", b"2")],
            authorizations: vec![],
        };
        assert!(s1.next(same).is_none(), "no change, no new version");
        let s2 = s1
            .next(EncodedConfig {
                addresses: vec![res("a", b"1"), res("c", b"3")],
                authorizations: vec![],
            })
            .unwrap();
        let mut changed = s2.changed[ADDRESS_TYPE].clone();
        changed.sort();
        assert_eq!(changed, vec!["b", "c"]);
        assert!(Arc::ptr_eq(
            &s1.resources[ADDRESS_TYPE]["a"],
            &s2.resources[ADDRESS_TYPE]["a"]
        ));
    }
}
