//! A waypoint Gateway's `status`: the `Accepted` and `Programmed`
//! conditions and `addresses`, merged into what the Gateway already carries
//! so that unchanged conditions keep their `lastTransitionTime` and an
//! unchanged status is not written at all.

use serde_json::{json, Value};

/// One condition as the deployer decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What the deployer says about one Gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayStatus {
    pub accepted: Condition,
    pub programmed: Condition,
    /// The waypoint Service's cluster IP, once the cluster has chosen it.
    pub address: Option<String>,
}

impl GatewayStatus {
    pub fn programmed(address: String) -> GatewayStatus {
        GatewayStatus {
            accepted: accepted(),
            programmed: Condition {
                type_: "Programmed",
                status: true,
                reason: "Programmed",
                message: format!("waypoint deployed; Service address {address}"),
            },
            address: Some(address),
        }
    }

    pub fn no_address() -> GatewayStatus {
        GatewayStatus {
            accepted: accepted(),
            programmed: Condition {
                type_: "Programmed",
                status: false,
                reason: "AddressNotAssigned",
                message: "waypoint deployed; its Service has no cluster IP yet".into(),
            },
            address: None,
        }
    }

    /// The objects could not all be written; the deployer retries.
    pub fn pending(why: String) -> GatewayStatus {
        GatewayStatus {
            accepted: accepted(),
            programmed: Condition {
                type_: "Programmed",
                status: false,
                reason: "Pending",
                message: why,
            },
            address: None,
        }
    }

    pub fn invalid(reason: &'static str, message: String) -> GatewayStatus {
        GatewayStatus {
            accepted: Condition {
                type_: "Accepted",
                status: false,
                reason,
                message: message.clone(),
            },
            programmed: Condition {
                type_: "Programmed",
                status: false,
                reason: "Invalid",
                message,
            },
            address: None,
        }
    }

    /// The `status` to write over `existing` (the Gateway's current
    /// `status`), or `None` when it already says this. Conditions of other
    /// types are kept; `lastTransitionTime` changes only with `status`.
    pub fn merged_into(&self, existing: &Value, generation: i64, now: &str) -> Option<Value> {
        let old: Vec<Value> = existing["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut conditions: Vec<Value> = old
            .iter()
            .filter(|c| c["type"] != "Accepted" && c["type"] != "Programmed")
            .cloned()
            .collect();
        for c in [&self.accepted, &self.programmed] {
            let status = if c.status { "True" } else { "False" };
            let previous = old.iter().find(|o| o["type"] == c.type_);
            let since = previous
                .filter(|p| p["status"] == status)
                .and_then(|p| p["lastTransitionTime"].as_str())
                .unwrap_or(now);
            conditions.push(json!({
                "type": c.type_,
                "status": status,
                "reason": c.reason,
                "message": c.message,
                "observedGeneration": generation,
                "lastTransitionTime": since,
            }));
        }
        let addresses: Vec<Value> = self
            .address
            .iter()
            .map(|ip| json!({"type": "IPAddress", "value": ip}))
            .collect();
        let same_conditions = {
            let key = |v: &Value| v["type"].as_str().unwrap_or_default().to_string();
            let mut a = old.clone();
            let mut b = conditions.clone();
            a.sort_by_key(key);
            b.sort_by_key(key);
            a == b
        };
        let old_addresses = existing["addresses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if same_conditions && old_addresses == addresses {
            return None;
        }
        Some(json!({"conditions": conditions, "addresses": addresses}))
    }
}

fn accepted() -> Condition {
    Condition {
        type_: "Accepted",
        status: true,
        reason: "Accepted",
        message: "waypoint Gateway accepted by istiod-lite".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_status_carries_both_conditions_and_the_address() {
        let s = GatewayStatus::programmed("10.96.0.7".into())
            .merged_into(&Value::Null, 3, "T1")
            .unwrap();
        assert_eq!(
            s["addresses"],
            json!([{"type": "IPAddress", "value": "10.96.0.7"}])
        );
        let conditions = s["conditions"].as_array().unwrap();
        assert_eq!(conditions.len(), 2);
        for c in conditions {
            assert_eq!(c["status"], "True");
            assert_eq!(c["observedGeneration"], 3);
            assert_eq!(c["lastTransitionTime"], "T1");
        }
    }

    #[test]
    fn an_unchanged_status_is_not_written_again() {
        let want = GatewayStatus::programmed("10.96.0.7".into());
        let written = want.merged_into(&Value::Null, 1, "T1").unwrap();
        assert_eq!(want.merged_into(&written, 1, "T2"), None);
        // A new generation is news, even with the same verdict.
        assert!(want.merged_into(&written, 2, "T2").is_some());
    }

    #[test]
    fn transition_times_move_only_when_the_status_does() {
        let first = GatewayStatus::no_address()
            .merged_into(&Value::Null, 1, "T1")
            .unwrap();
        let second = GatewayStatus::programmed("10.96.0.7".into())
            .merged_into(&first, 1, "T2")
            .unwrap();
        let time = |s: &Value, t: &str| {
            s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == t)
                .unwrap()["lastTransitionTime"]
                .clone()
        };
        assert_eq!(time(&second, "Accepted"), "T1");
        assert_eq!(time(&second, "Programmed"), "T2");
    }

    #[test]
    fn other_condition_types_are_kept_and_ours_replaced() {
        let existing = json!({"conditions": [
            {"type": "Accepted", "status": "Unknown", "reason": "Pending", "message": "Waiting for controller",
             "lastTransitionTime": "1970-01-01T00:00:00Z"},
            {"type": "Example", "status": "True", "reason": "X", "message": "",
             "lastTransitionTime": "T0"},
        ]});
        let s = GatewayStatus::invalid("Invalid", "bad name".into())
            .merged_into(&existing, 1, "T1")
            .unwrap();
        let conditions = s["conditions"].as_array().unwrap();
        assert_eq!(conditions.len(), 3);
        assert_eq!(conditions[0]["type"], "Example");
        let accepted = conditions.iter().find(|c| c["type"] == "Accepted").unwrap();
        assert_eq!(
            (
                &accepted["status"],
                &accepted["reason"],
                &accepted["lastTransitionTime"]
            ),
            (&json!("False"), &json!("Invalid"), &json!("T1"))
        );
        assert_eq!(s["addresses"], json!([]));
    }
}
