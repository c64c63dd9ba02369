//! Topic names: the same on the cloud broker and on every edge broker.

use crate::names::validate_name;
use crate::rollout::Scope;

/// The default topic prefix.
pub const DEFAULT_PREFIX: &str = "roost/v1";

/// Topic builder/parser for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics::new(DEFAULT_PREFIX)
    }
}

/// A parsed deployment topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentTopic {
    /// The scope the topic addresses.
    pub scope: Scope,
    /// The deployment name.
    pub deployment: String,
}

/// Which store topic a message was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreTopicKind {
    /// `…/status`
    Status,
    /// `…/events`
    Events,
    /// `…/presence`
    Presence,
}

impl Topics {
    /// Topics under `prefix` (without a trailing slash).
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The deployment topic for a scope.
    pub fn deployment(&self, scope: &Scope, deployment: &str) -> String {
        match scope {
            Scope::Fleet => format!("{}/fleet/deployments/{deployment}", self.prefix),
            Scope::Group(g) => format!("{}/groups/{g}/deployments/{deployment}", self.prefix),
            Scope::Store(s) => format!("{}/stores/{s}/deployments/{deployment}", self.prefix),
        }
    }

    /// The subscription filter for every deployment of a scope.
    pub fn deployment_filter(&self, scope: &Scope) -> String {
        self.deployment(scope, "+")
    }

    /// The deployment filters one store subscribes to: its own, its groups', the fleet's.
    pub fn store_deployment_filters(&self, store: &str, groups: &[String]) -> Vec<String> {
        std::iter::once(Scope::Store(store.to_owned()))
            .chain(groups.iter().map(|g| Scope::Group(g.clone())))
            .chain(std::iter::once(Scope::Fleet))
            .map(|s| self.deployment_filter(&s))
            .collect()
    }

    /// Filter matching every deployment topic of every scope (for cloud services).
    pub fn all_deployment_filters(&self) -> Vec<String> {
        vec![
            format!("{}/fleet/deployments/+", self.prefix),
            format!("{}/groups/+/deployments/+", self.prefix),
            format!("{}/stores/+/deployments/+", self.prefix),
        ]
    }

    /// A store's status topic.
    pub fn status(&self, store: &str) -> String {
        format!("{}/stores/{store}/status", self.prefix)
    }

    /// A store's events topic.
    pub fn events(&self, store: &str) -> String {
        format!("{}/stores/{store}/events", self.prefix)
    }

    /// A store's presence topic.
    pub fn presence(&self, store: &str) -> String {
        format!("{}/stores/{store}/presence", self.prefix)
    }

    /// A store's delivery confirmation topic, on the edge broker only (bridge → agent,
    /// retained): `{"roostseq": N}` = every event up to N is in the bridge's outbox.
    pub fn ack(&self, store: &str) -> String {
        format!("{}/stores/{store}/ack", self.prefix)
    }

    /// A store's end-to-end confirmation topic on the cloud broker (fleet record → bridge,
    /// retained, published only by the controller identity): `{"roostseq": N}` = every event
    /// of the store up to N is committed in the fleet database.
    pub fn confirmed(&self, store: &str) -> String {
        format!("{}/stores/{store}/confirmed", self.prefix)
    }

    /// The signed fleet snapshot (cloud → every store, retained): the current sequence of
    /// every desired-state topic, so an agent notices withheld or rolled-back desired state.
    pub fn snapshot(&self) -> String {
        format!("{}/fleet/snapshot", self.prefix)
    }

    /// A store's profile topic (cloud → store, retained, signed): its labels, groups, time
    /// zone and vars from the fleet repository's inventory.
    pub fn profile(&self, store: &str) -> String {
        format!("{}/stores/{store}/profile", self.prefix)
    }

    /// Filter matching every store's profile topic (for cloud services).
    pub fn all_profiles(&self) -> String {
        format!("{}/stores/+/profile", self.prefix)
    }

    /// The store a profile topic is for, if `topic` is one.
    pub fn parse_profile_topic(&self, topic: &str) -> Option<String> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            ["stores", s, "profile"] => validate_name(s).ok().map(|()| (*s).to_owned()),
            _ => None,
        }
    }

    /// Filters for a store topic kind across all stores (`+` for the store).
    pub fn all_stores(&self, kind: StoreTopicKind) -> String {
        let leaf = match kind {
            StoreTopicKind::Status => "status",
            StoreTopicKind::Events => "events",
            StoreTopicKind::Presence => "presence",
        };
        format!("{}/stores/+/{leaf}", self.prefix)
    }

    /// Parses a deployment topic; `None` if it is not one or a name is invalid.
    pub fn parse_deployment(&self, topic: &str) -> Option<DeploymentTopic> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (scope, deployment) = match parts.as_slice() {
            ["fleet", "deployments", d] => (Scope::Fleet, *d),
            ["groups", g, "deployments", d] => (Scope::Group((*g).to_owned()), *d),
            ["stores", s, "deployments", d] => (Scope::Store((*s).to_owned()), *d),
            _ => return None,
        };
        match &scope {
            Scope::Group(n) | Scope::Store(n) => validate_name(n).ok()?,
            Scope::Fleet => {}
        }
        validate_name(deployment).ok()?;
        Some(DeploymentTopic {
            scope,
            deployment: deployment.to_owned(),
        })
    }

    /// Parses `…/stores/{store}/{status|events|presence}`.
    pub fn parse_store_topic(&self, topic: &str) -> Option<(String, StoreTopicKind)> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["stores", s, leaf] => {
                validate_name(s).ok()?;
                let kind = match *leaf {
                    "status" => StoreTopicKind::Status,
                    "events" => StoreTopicKind::Events,
                    "presence" => StoreTopicKind::Presence,
                    _ => return None,
                };
                Some(((*s).to_owned(), kind))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn profile_topics() {
        let t = Topics::default();
        assert_eq!(
            t.profile("store-0042"),
            "roost/v1/stores/store-0042/profile"
        );
        assert_eq!(
            t.parse_profile_topic("roost/v1/stores/store-0042/profile")
                .as_deref(),
            Some("store-0042")
        );
        assert_eq!(
            t.parse_profile_topic("roost/v1/stores/store-0042/status"),
            None
        );
        assert_eq!(t.parse_profile_topic("roost/v1/stores/Bad/profile"), None);
        assert_eq!(t.parse_profile_topic("other/stores/s/profile"), None);
        assert_eq!(t.all_profiles(), "roost/v1/stores/+/profile");
    }

    use super::*;

    #[test]
    fn roundtrip() {
        let t = Topics::default();
        for scope in [
            Scope::Fleet,
            Scope::Group("canary".into()),
            Scope::Store("store-0001".into()),
        ] {
            let topic = t.deployment(&scope, "web");
            let parsed = t.parse_deployment(&topic).expect("parse");
            assert_eq!(parsed.scope, scope);
            assert_eq!(parsed.deployment, "web");
        }
        assert_eq!(
            t.deployment(&Scope::Group("canary".into()), "web"),
            "roost/v1/groups/canary/deployments/web"
        );
        assert!(t
            .parse_deployment("roost/v1/fleet/deployments/Bad_Name")
            .is_none());
        assert!(t
            .parse_deployment("roost/v2/fleet/deployments/web")
            .is_none());
        assert!(t
            .parse_deployment("roost/v1/fleet/deployments/web/x")
            .is_none());
        assert_eq!(
            t.parse_store_topic("roost/v1/stores/store-0001/events"),
            Some(("store-0001".into(), StoreTopicKind::Events))
        );
        assert_eq!(t.snapshot(), "roost/v1/fleet/snapshot");
        assert!(t.parse_deployment(&t.snapshot()).is_none());
        assert_eq!(
            t.parse_store_topic("roost/v1/stores/store-0001/other"),
            None
        );
    }
}
