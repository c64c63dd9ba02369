//! Which group topics the bridge carries down: the configured groups until a store profile
//! arrives on the store's profile topic from the cloud, then the groups it names (persisted,
//! so a bridge restarted offline subscribes to them). The bridge reads the profile without
//! verifying its signatures (it holds no trusted keys): the list only chooses subscriptions,
//! and the agent verifies the profile and every rollout before anything is applied (the
//! risk is written down in docs/security.md).

use roost_schemas::profile::ProfileError;
use roost_schemas::{Envelope, Profile, Scope, Topics, VerifyError, PROFILE_PAYLOAD_TYPE};

/// Why a message on the profile topic does not change the groups the bridge follows.
#[derive(Debug, thiserror::Error)]
pub enum GroupsError {
    /// Not a DSSE envelope.
    #[error("not a DSSE envelope")]
    Envelope(#[source] serde_json::Error),
    /// Not a profile's envelope (payload type, base64).
    #[error("not a store profile's envelope")]
    PayloadType(#[source] VerifyError),
    /// The payload is not a valid profile.
    #[error("not a valid store profile")]
    Profile(#[source] ProfileError),
    /// A profile of another store.
    #[error("the profile of store {0}")]
    OtherStore(String),
}

/// What a message on the store's profile topic says about its groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileGroups {
    /// An empty payload: the retained profile was cleared; the groups stay as they are.
    Cleared,
    /// A profile that names no groups: the store keeps its configured ones.
    Configured,
    /// A profile naming these groups, in precedence order.
    Named(Vec<String>),
}

/// What a message on `store`'s profile topic says about its groups. Signatures are not
/// checked (see the module's doc).
pub fn profile_groups(store: &str, payload: &[u8]) -> Result<ProfileGroups, GroupsError> {
    if payload.is_empty() {
        return Ok(ProfileGroups::Cleared);
    }
    let env: Envelope = serde_json::from_slice(payload).map_err(GroupsError::Envelope)?;
    let body = env
        .unverified_payload(PROFILE_PAYLOAD_TYPE)
        .map_err(GroupsError::PayloadType)?;
    let profile = Profile::from_payload(&body).map_err(GroupsError::Profile)?;
    if profile.store != store {
        return Err(GroupsError::OtherStore(profile.store));
    }
    Ok(match profile.groups {
        Some(g) => ProfileGroups::Named(g),
        None => ProfileGroups::Configured,
    })
}

/// What the bridge subscribes to on the cloud broker: the deployment topics of the store, of
/// `groups` and of the fleet, the fleet snapshot, the store's profile, and the fleet record's
/// end-to-end confirmation for the store (not carried down: the bridge consumes it).
pub fn cloud_subscriptions(topics: &Topics, store: &str, groups: &[String]) -> Vec<String> {
    let mut subs = topics.store_deployment_filters(store, groups);
    subs.push(topics.snapshot());
    subs.push(topics.profile(store));
    subs.push(topics.confirmed(store));
    subs
}

/// Whether a topic from the cloud is carried down: the deployment topics of the fleet, of
/// `groups` and of the store itself, the fleet snapshot and the store's profile. Anything
/// else (a group the store left, whose messages may still be on their way, or another
/// store's topic) is dropped.
pub fn is_downward(topics: &Topics, store: &str, groups: &[String], topic: &str) -> bool {
    match topics.parse_deployment(topic) {
        Some(t) => match t.scope {
            Scope::Fleet => true,
            Scope::Group(g) => groups.contains(&g),
            Scope::Store(s) => s == store,
        },
        None => topic == topics.snapshot() || topic == topics.profile(store),
    }
}

/// Whether a stored topic is a deployment topic of a group not in `groups`: one the bridge
/// must clear from its store and the edge broker when it follows `groups`.
pub fn is_left(topics: &Topics, groups: &[String], topic: &str) -> bool {
    matches!(
        topics.parse_deployment(topic).map(|t| t.scope),
        Some(Scope::Group(g)) if !groups.contains(&g)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::SigningKey;

    fn groups(v: &[&str]) -> Vec<String> {
        v.iter().map(|g| (*g).to_owned()).collect()
    }

    fn envelope(payload_type: &str, body: serde_json::Value) -> Vec<u8> {
        let key = SigningKey::from_seed(&[9; 32]).expect("key");
        let body = serde_json::to_vec(&body).expect("json");
        serde_json::to_vec(&key.sign(payload_type, &body)).expect("json")
    }

    #[test]
    fn the_groups_of_a_profile() {
        let profile = |store: &str, groups: &[&str]| {
            serde_json::json!({"store": store, "sequence": 4, "issued_at": "2026-12-06T03:00:00Z",
                "groups": groups, "labels": {"region": "us-south"}})
        };
        let good = envelope(PROFILE_PAYLOAD_TYPE, profile("s1", &["us-south", "canary"]));
        assert_eq!(
            profile_groups("s1", &good).expect("ok"),
            ProfileGroups::Named(groups(&["us-south", "canary"]))
        );
        assert_eq!(
            profile_groups("s1", b"").expect("cleared"),
            ProfileGroups::Cleared
        );
        let unnamed = envelope(
            PROFILE_PAYLOAD_TYPE,
            serde_json::json!({"store": "s1", "sequence": 5, "issued_at": "2026-12-06T03:00:00Z"}),
        );
        assert_eq!(
            profile_groups("s1", &unnamed).expect("ok"),
            ProfileGroups::Configured
        );
        let refused: Vec<(&str, Vec<u8>)> = vec![
            ("not JSON", b"{nope".to_vec()),
            (
                "a rollout envelope",
                envelope(roost_schemas::PAYLOAD_TYPE, profile("s1", &["x"])),
            ),
            (
                "another store's profile",
                envelope(PROFILE_PAYLOAD_TYPE, profile("s2", &["x"])),
            ),
            (
                "an invalid group name",
                envelope(PROFILE_PAYLOAD_TYPE, profile("s1", &["Not A Name"])),
            ),
            (
                "no sequence",
                envelope(
                    PROFILE_PAYLOAD_TYPE,
                    serde_json::json!({"store": "s1", "issued_at": "2026-12-06T03:00:00Z"}),
                ),
            ),
        ];
        for (what, payload) in refused {
            assert!(profile_groups("s1", &payload).is_err(), "{what}");
        }
    }

    #[test]
    fn carries_the_groups_in_force_the_store_and_the_fleet_down() {
        let t = Topics::default();
        let g = groups(&["us-south"]);
        let down = |topic: &str| is_downward(&t, "s1", &g, topic);
        assert!(down("roost/v1/fleet/deployments/web"));
        assert!(down("roost/v1/groups/us-south/deployments/web"));
        assert!(!down("roost/v1/groups/us-east/deployments/web"));
        assert!(down("roost/v1/stores/s1/deployments/web"));
        assert!(!down("roost/v1/stores/s2/deployments/web"));
        assert!(down("roost/v1/fleet/snapshot"));
        assert!(!down("roost/v1/fleet/snapshot/x"));
        assert!(down("roost/v1/stores/s1/profile"));
        assert!(!down("roost/v1/stores/s2/profile"));
        assert!(!down("roost/v1/stores/s1/status"));
        assert_eq!(
            cloud_subscriptions(&t, "s1", &g),
            [
                "roost/v1/stores/s1/deployments/+",
                "roost/v1/groups/us-south/deployments/+",
                "roost/v1/fleet/deployments/+",
                "roost/v1/fleet/snapshot",
                "roost/v1/stores/s1/profile",
                "roost/v1/stores/s1/confirmed",
            ]
        );
        assert!(is_left(&t, &g, "roost/v1/groups/us-east/deployments/web"));
        assert!(!is_left(&t, &g, "roost/v1/groups/us-south/deployments/web"));
        assert!(!is_left(&t, &g, "roost/v1/fleet/deployments/web"));
        assert!(!is_left(&t, &g, "roost/v1/stores/s1/profile"));
    }
}
