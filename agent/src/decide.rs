//! Pure decisions over data, tested without I/O: is a sequence new, which rollout wins for a
//! deployment, and whether a source URL is allowed. (What the reconciler does next is
//! `reconcile::machine::next_step`.)

use roost_schemas::{Rollout, Scope};

/// What to do with a verified envelope, given the last one accepted for its (scope, deployment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceVerdict {
    /// Newer: accept.
    Accept,
    /// The same envelope again (a retained message redelivered after a reconnect): ignore.
    Duplicate,
    /// Not newer and different: reject as a replay.
    Replay,
}

/// Classifies a sequence against the last accepted one (`(sequence, payload digest)`).
pub fn classify_sequence(
    last: Option<(u64, &str)>,
    sequence: u64,
    digest: &str,
) -> SequenceVerdict {
    match last {
        None => SequenceVerdict::Accept,
        Some((s, _)) if sequence > s => SequenceVerdict::Accept,
        Some((s, d)) if sequence == s && d == digest => SequenceVerdict::Duplicate,
        Some(_) => SequenceVerdict::Replay,
    }
}

/// Precedence rank of a scope for a store (lower wins): the store itself, then its groups in
/// configured order, then the fleet. `None` if the scope does not address this store.
pub fn scope_rank(scope: &Scope, store: &str, groups: &[String]) -> Option<usize> {
    match scope {
        Scope::Store(s) if s == store => Some(0),
        Scope::Store(_) => None,
        Scope::Group(g) => groups.iter().position(|x| x == g).map(|i| i + 1),
        Scope::Fleet => Some(groups.len() + 1),
    }
}

/// The desired state of one deployment after precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// Nothing was ever accepted for this deployment.
    Unknown,
    /// Every scope that addressed this store has withdrawn: remove it.
    Remove {
        /// The tombstone that decided it (highest precedence one).
        rollout: Box<Rollout>,
    },
    /// This rollout wins.
    Apply {
        /// The winning rollout.
        rollout: Box<Rollout>,
    },
}

/// Resolves the winner among the last accepted rollout of every scope slot for one deployment.
/// A tombstone empties its slot; the best remaining non-tombstone wins.
pub fn resolve(slots: &[Rollout], store: &str, groups: &[String]) -> Desired {
    let mut ranked: Vec<(usize, &Rollout)> = slots
        .iter()
        .filter_map(|r| scope_rank(&r.scope, store, groups).map(|k| (k, r)))
        .collect();
    ranked.sort_by_key(|(k, _)| *k);
    if let Some((_, r)) = ranked.iter().find(|(_, r)| !r.remove) {
        return Desired::Apply {
            rollout: Box::new((*r).clone()),
        };
    }
    match ranked.first() {
        Some((_, r)) => Desired::Remove {
            rollout: Box::new((*r).clone()),
        },
        None => Desired::Unknown,
    }
}

/// True when `url` is allowed by one of the configured prefixes. A prefix matches whole URL
/// components only: `git://h/a` allows `git://h/a/x.git` and `git://h/a.git`? No: only
/// `git://h/a` itself or what continues with `/`, unless the prefix ends with `/`.
pub fn source_allowed(url: &str, allowed: &[String]) -> bool {
    if url.contains("..") || url.contains('@') && !url.starts_with("https://") {
        return false;
    }
    allowed.iter().any(|p| {
        let p = p.as_str();
        url == p || (url.starts_with(p) && (p.ends_with('/') || url[p.len()..].starts_with('/')))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::{Policy, Source};

    fn r(scope: Scope, seq: u64, rev: char, remove: bool) -> Rollout {
        Rollout {
            deployment: "web".into(),
            scope,
            sequence: seq,
            issued_at: "2026-11-26T10:00:00Z".into(),
            source: Some(Source {
                url: "git://h/r.git".into(),
                revision: rev.to_string().repeat(40),
                path: "apps/web".into(),
            }),
            not_before: None,
            policy: Policy::default(),
            remove,
            origin: None,
        }
    }

    fn winner(d: &Desired) -> Option<char> {
        match d {
            Desired::Apply { rollout } => rollout
                .source
                .as_ref()
                .and_then(|s| s.revision.chars().next()),
            _ => None,
        }
    }

    #[test]
    fn sequences() {
        assert_eq!(classify_sequence(None, 1, "a"), SequenceVerdict::Accept);
        assert_eq!(
            classify_sequence(Some((3, "a")), 4, "b"),
            SequenceVerdict::Accept
        );
        assert_eq!(
            classify_sequence(Some((3, "a")), 3, "a"),
            SequenceVerdict::Duplicate
        );
        assert_eq!(
            classify_sequence(Some((3, "a")), 3, "b"),
            SequenceVerdict::Replay
        );
        assert_eq!(
            classify_sequence(Some((3, "a")), 2, "a"),
            SequenceVerdict::Replay
        );
    }

    #[test]
    fn precedence_store_then_groups_in_order_then_fleet() {
        let groups = vec!["canary".to_string(), "all".to_string()];
        let fleet = r(Scope::Fleet, 1, 'a', false);
        let all = r(Scope::Group("all".into()), 1, 'b', false);
        let canary = r(Scope::Group("canary".into()), 1, 'c', false);
        let store = r(Scope::Store("s1".into()), 1, 'd', false);
        let other_group = r(Scope::Group("eu".into()), 1, 'e', false);
        let other_store = r(Scope::Store("s2".into()), 1, 'f', false);
        let res = |slots: &[Rollout]| winner(&resolve(slots, "s1", &groups));
        assert_eq!(res(std::slice::from_ref(&fleet)), Some('a'));
        assert_eq!(res(&[fleet.clone(), all.clone()]), Some('b'));
        assert_eq!(
            res(&[all.clone(), canary.clone(), fleet.clone()]),
            Some('c')
        );
        assert_eq!(
            res(&[fleet.clone(), store.clone(), canary.clone()]),
            Some('d')
        );
        assert_eq!(res(&[fleet.clone(), other_group, other_store]), Some('a'));
        // Removing the winner falls back to the next one.
        let store_gone = r(Scope::Store("s1".into()), 2, 'd', true);
        assert_eq!(
            res(&[fleet.clone(), store_gone.clone(), canary.clone()]),
            Some('c')
        );
        let fleet_gone = r(Scope::Fleet, 2, 'a', true);
        assert!(matches!(
            resolve(&[fleet_gone, store_gone], "s1", &groups),
            Desired::Remove { .. }
        ));
        assert_eq!(resolve(&[], "s1", &groups), Desired::Unknown);
    }

    #[test]
    fn source_allow_list() {
        let allowed = vec![
            "git://127.0.0.1:9418/fleet".to_string(),
            "file:///srv/".to_string(),
        ];
        assert!(source_allowed("git://127.0.0.1:9418/fleet", &allowed));
        assert!(source_allowed(
            "git://127.0.0.1:9418/fleet/apps.git",
            &allowed
        ));
        assert!(!source_allowed(
            "git://127.0.0.1:9418/fleet-evil.git",
            &allowed
        ));
        assert!(!source_allowed("git://127.0.0.1:9418/fleet/../x", &allowed));
        assert!(source_allowed("file:///srv/repo.git", &allowed));
        assert!(!source_allowed("git://evil.example/fleet", &allowed));
    }
}
