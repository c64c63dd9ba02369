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
/// order (the groups in force: the last accepted profile's, else the configured ones), then
/// the fleet. `None` if the scope does not address this store (another store, a group it is
/// not in or has left).
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
    /// No scope that addresses the store has the deployment, only groups the store has left:
    /// remove it, as for a tombstone.
    Left {
        /// The rollout of a scope the store left (the first by scope key).
        rollout: Box<Rollout>,
    },
    /// This rollout wins.
    Apply {
        /// The winning rollout.
        rollout: Box<Rollout>,
        /// The digest of the store context its rendering reads (`None`: it reads none), so
        /// that a changed context renders it again ([`crate::profile::context_for`]).
        context: Option<String>,
    },
}

impl Desired {
    /// The rollout that decided it, if any.
    pub fn rollout(&self) -> Option<&Rollout> {
        match self {
            Desired::Unknown => None,
            Desired::Remove { rollout } | Desired::Left { rollout } => Some(rollout),
            Desired::Apply { rollout, .. } => Some(rollout),
        }
    }
}

/// Resolves the winner among the last accepted rollout of every scope slot for one deployment,
/// with the store's groups in force. A tombstone empties its slot; the best remaining
/// non-tombstone wins. Slots of scopes that do not address the store (groups it left) do not
/// count: when only they remain, the deployment has [`Desired::Left`] the store.
pub fn resolve(slots: &[Rollout], store: &str, groups: &[String]) -> Desired {
    let mut ranked: Vec<(usize, &Rollout)> = slots
        .iter()
        .filter_map(|r| scope_rank(&r.scope, store, groups).map(|k| (k, r)))
        .collect();
    ranked.sort_by_key(|(k, _)| *k);
    if let Some((_, r)) = ranked.iter().find(|(_, r)| !r.remove) {
        return Desired::Apply {
            rollout: Box::new((*r).clone()),
            context: None,
        };
    }
    match (ranked.first(), slots.iter().min_by_key(|r| r.scope.key())) {
        (Some((_, r)), _) => Desired::Remove {
            rollout: Box::new((*r).clone()),
        },
        (None, Some(r)) => Desired::Left {
            rollout: Box::new(r.clone()),
        },
        (None, None) => Desired::Unknown,
    }
}

/// The transports the agent fetches over. Anything else (`http` without TLS, `ext::`, `fd::`,
/// `ssh`, scp-like `user@host:path`, `git+ssh`, …) is refused before git2 ever sees the URL.
/// (ssh is not among them: the agent has no ssh key configuration, and the agent links no
/// libssh2; private repositories are fetched over https with a token.)
pub const TRANSPORTS: [&str; 3] = ["https", "git", "file"];

/// Why a source URL (or an allow-list entry) is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Not a `scheme://…` URL of an allowed transport.
    #[error("transport not allowed (only https://, git://, file://): {0}")]
    Transport(String),
    /// User-info (`user@`, `user:password@`): never allowed.
    #[error(
        "user-info is not allowed in source URLs (credentials belong in [[git.credentials]]): {0}"
    )]
    UserInfo(String),
    /// Not a URL this parser accepts (percent-encoding, `..`, empty segments, odd hosts, …).
    #[error("not a plain source URL ({why}): {url}")]
    Syntax {
        /// What is wrong.
        why: &'static str,
        /// The URL with any user-info removed.
        url: String,
    },
    /// A well-formed URL that no allow-list entry covers.
    #[error("source {0} is not on the allow-list")]
    NotAllowed(String),
}

/// A source URL split into the parts the allow-list compares: no normalisation beyond
/// lower-casing the host and filling in the scheme's default port, because everything
/// ambiguous (percent-encoding, `.`/`..` segments, backslashes, queries, fragments,
/// non-ASCII, user-info) is refused instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceUrl {
    /// `https`, `git` or `file`.
    pub scheme: String,
    /// Host, lower case (`""` for `file://`; IPv6 without brackets).
    pub host: String,
    /// The port, with the scheme's default filled in (`None` for `file://`).
    pub port: Option<u16>,
    /// Path segments (no empty, `.` or `..` segment; a trailing `/` is dropped).
    pub segments: Vec<String>,
}

/// Removes user-info from a URL for messages and logs (`https://***@host/…`).
pub fn redact_url(url: &str) -> String {
    let shown: String = url.chars().take(300).collect();
    let Some((scheme, rest)) = shown.split_once("://") else {
        return shown;
    };
    let auth_end = rest.find('/').unwrap_or(rest.len());
    match rest[..auth_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => shown,
    }
}

impl SourceUrl {
    /// Parses a URL strictly (see the type's doc).
    pub fn parse(url: &str) -> Result<SourceUrl, SourceError> {
        let syntax = |why: &'static str| SourceError::Syntax {
            why,
            url: redact_url(url),
        };
        if url.is_empty() || url.len() > 2048 {
            return Err(syntax("must be 1..2048 characters"));
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(SourceError::Transport(redact_url(url)));
        };
        if !TRANSPORTS.contains(&scheme) {
            return Err(SourceError::Transport(redact_url(url)));
        }
        if !url.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err(syntax("only printable ASCII without spaces"));
        }
        if url.contains(['?', '#']) {
            return Err(syntax("no query or fragment"));
        }
        if url.contains(['%', '\\']) {
            return Err(syntax("no percent-encoding or backslashes"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(SourceError::UserInfo(redact_url(url)));
        }
        let hostport = authority;
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| syntax("unclosed IPv6 host"))?;
            if h.is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            {
                return Err(syntax("bad IPv6 host"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| syntax("bad port"))?),
            };
            (h.to_ascii_lowercase(), port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
                None => (hostport.to_ascii_lowercase(), None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => {
                if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax("bad port"));
                }
                Some(
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| syntax("bad port"))?,
                )
            }
        };
        let host = if scheme == "file" {
            if port.is_some() || !(host.is_empty() || host == "localhost") {
                return Err(syntax("file:// URLs name no host (or localhost)"));
            }
            String::new()
        } else {
            if host.is_empty() {
                return Err(syntax("a host is required"));
            }
            if !host.contains(':') {
                let label_ok = |l: &str| {
                    !l.is_empty()
                        && l.len() <= 63
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                };
                if host.len() > 253 || !host.split('.').all(label_ok) {
                    return Err(syntax("bad host name"));
                }
            }
            host
        };
        let port = port.or(match scheme {
            "https" => Some(443),
            "git" => Some(9418),
            _ => None,
        });
        let mut segments = Vec::new();
        if !path.is_empty() {
            let inner = path.strip_prefix('/').unwrap_or(path);
            let inner = inner.strip_suffix('/').unwrap_or(inner);
            if !inner.is_empty() {
                for seg in inner.split('/') {
                    match seg {
                        "" => return Err(syntax("empty path segment")),
                        "." | ".." => return Err(syntax("'.' or '..' path segment")),
                        s => segments.push(s.to_owned()),
                    }
                }
            }
        }
        Ok(SourceUrl {
            scheme: scheme.to_owned(),
            host,
            port,
            segments,
        })
    }

    /// Whether `self`, as an allow-list entry, covers `url`: same scheme, host and
    /// port, and `self`'s path segments are the first segments of `url`'s (whole segments:
    /// `…/fleet` covers `…/fleet` and `…/fleet/x.git`, not `…/fleet-evil` or `…/fleet.git`).
    pub fn covers(&self, url: &SourceUrl) -> bool {
        self.scheme == url.scheme
            && self.host == url.host
            && self.port == url.port
            && url.segments.len() >= self.segments.len()
            && self.segments.iter().zip(&url.segments).all(|(a, b)| a == b)
    }
}

/// Checks a source URL against the parsed allow-list.
pub fn source_allowed(url: &str, allowed: &[SourceUrl]) -> Result<SourceUrl, SourceError> {
    let parsed = SourceUrl::parse(url)?;
    if allowed.iter().any(|a| a.covers(&parsed)) {
        Ok(parsed)
    } else {
        Err(SourceError::NotAllowed(redact_url(url)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::{Policy, Source};

    fn r(scope: Scope, seq: u64, rev: char, remove: bool) -> Rollout {
        Rollout {
            schedule: Default::default(),
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
            Desired::Apply { rollout, .. } => rollout
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

    /// The groups come from the last accepted profile: a label change in Git moves the store
    /// from one group to another, and the decision follows with the same slots. Table:
    /// (case, groups in force, slots, winner's revision or what happens).
    #[test]
    fn precedence_with_groups_from_a_profile() {
        #[derive(Debug, PartialEq)]
        enum Want {
            Apply(char),
            Remove,
            Left(&'static str),
            Unknown,
        }
        let east = r(Scope::Group("us-east".into()), 5, 'e', false);
        let south = r(Scope::Group("us-south".into()), 7, 's', false);
        let canary = r(Scope::Group("canary".into()), 9, 'c', false);
        let fleet = r(Scope::Fleet, 1, 'f', false);
        let store = r(Scope::Store("s1".into()), 2, 'd', false);
        let east_gone = r(Scope::Group("us-east".into()), 6, 'e', true);
        let g = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<String>>();
        let rows: Vec<(&str, Vec<String>, Vec<Rollout>, Want)> = vec![
            (
                "configured groups: us-east",
                g(&["us-east"]),
                vec![east.clone(), south.clone()],
                Want::Apply('e'),
            ),
            (
                "the profile moves the store to us-south",
                g(&["us-south"]),
                vec![east.clone(), south.clone()],
                Want::Apply('s'),
            ),
            (
                "the order of the profile's groups is the precedence",
                g(&["us-south", "canary"]),
                vec![canary.clone(), south.clone()],
                Want::Apply('s'),
            ),
            (
                "reversed",
                g(&["canary", "us-south"]),
                vec![canary.clone(), south.clone()],
                Want::Apply('c'),
            ),
            (
                "a left group falls through to the fleet",
                g(&["us-south"]),
                vec![east.clone(), fleet.clone()],
                Want::Apply('f'),
            ),
            (
                "the store's own scope still wins",
                g(&["us-east"]),
                vec![east.clone(), store.clone()],
                Want::Apply('d'),
            ),
            (
                "only a left group had it: removed",
                g(&["us-south"]),
                vec![east.clone()],
                Want::Left("group:us-east"),
            ),
            (
                "no groups at all: removed",
                g(&[]),
                vec![south.clone(), east.clone()],
                Want::Left("group:us-east"),
            ),
            (
                "a left group's tombstone: nothing to fall back to",
                g(&["us-south"]),
                vec![east_gone.clone()],
                Want::Left("group:us-east"),
            ),
            (
                "a tombstone of a group in force still removes",
                g(&["us-east"]),
                vec![east_gone.clone(), south.clone()],
                Want::Remove,
            ),
            ("nothing accepted", g(&["us-south"]), vec![], Want::Unknown),
        ];
        for (case, groups, slots, want) in rows {
            let got = match resolve(&slots, "s1", &groups) {
                d @ Desired::Apply { .. } => Want::Apply(winner(&d).expect("revision")),
                Desired::Remove { .. } => Want::Remove,
                Desired::Left { rollout } => Want::Left(match rollout.scope.key().as_str() {
                    "group:us-east" => "group:us-east",
                    other => panic!("{case}: left {other}"),
                }),
                Desired::Unknown => Want::Unknown,
            };
            assert_eq!(got, want, "{case}");
        }
    }

    fn list(entries: &[&str]) -> Vec<SourceUrl> {
        entries
            .iter()
            .map(|e| SourceUrl::parse(e).expect("allow-list entry"))
            .collect()
    }

    #[test]
    fn source_allow_list() {
        let allowed = list(&[
            "git://127.0.0.1:9418/fleet",
            "file:///srv/",
            "https://git.example/org/",
            "https://[::1]:8443/repos",
        ]);
        let ok = |u: &str| source_allowed(u, &allowed).is_ok();
        let why = |u: &str| source_allowed(u, &allowed).expect_err(u);
        // Allowed: whole path components, default ports, host case.
        for u in [
            "git://127.0.0.1:9418/fleet",
            "git://127.0.0.1/fleet/apps.git",
            "git://127.0.0.1:9418/fleet/",
            "file:///srv/repo.git",
            "file://localhost/srv/repo.git",
            "https://git.example/org/fleet.git",
            "https://GIT.example:443/org/fleet.git",
            "https://[::1]:8443/repos/x.git",
        ] {
            assert!(ok(u), "{u}");
        }
        // Refused, and why.
        type Check = fn(&SourceError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("git://127.0.0.1:9418/fleet-evil.git", |e| {
                matches!(e, SourceError::NotAllowed(_))
            }),
            ("git://127.0.0.1:9418/fleet/../x", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("git://127.0.0.1:9418/fleet/%2e%2e/x", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("git://127.0.0.1:9418/fleet//x", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("git://127.0.0.1:9419/fleet", |e| {
                matches!(e, SourceError::NotAllowed(_))
            }),
            ("git://evil.example/fleet", |e| {
                matches!(e, SourceError::NotAllowed(_))
            }),
            ("https://git.example.evil.com/org/x.git", |e| {
                matches!(e, SourceError::NotAllowed(_))
            }),
            ("https://git.example./org/x.git", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("https://git.example@evil.com/org/x.git", |e| {
                matches!(e, SourceError::UserInfo(_))
            }),
            ("https://user@git.example/org/x.git", |e| {
                matches!(e, SourceError::UserInfo(_))
            }),
            ("https://u:token@git.example/org/x.git", |e| {
                matches!(e, SourceError::UserInfo(_))
            }),
            ("git://evil@127.0.0.1:9418/fleet", |e| {
                matches!(e, SourceError::UserInfo(_))
            }),
            ("ssh://git@git.example/org/x.git", |e| {
                matches!(e, SourceError::Transport(_))
            }),
            ("ssh://git.example/org/x.git", |e| {
                matches!(e, SourceError::Transport(_))
            }),
            ("https://evil.com#@git.example/org/x.git", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("https://evil.com?@git.example/org/x.git", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("https://git.example\\@evil.com/org/x", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("http://git.example/org/x.git", |e| {
                matches!(e, SourceError::Transport(_))
            }),
            ("ext::sh -c touch% /tmp/pwned", |e| {
                matches!(e, SourceError::Transport(_))
            }),
            ("fd::17/fleet", |e| matches!(e, SourceError::Transport(_))),
            ("git@git.example:org/x.git", |e| {
                matches!(e, SourceError::Transport(_))
            }),
            ("git+ssh://git@git.example/org/x.git", |e| {
                matches!(e, SourceError::Transport(_))
            }),
            ("HTTPS://git.example/org/x.git", |e| {
                matches!(e, SourceError::Transport(_))
            }),
            ("file://evil.example/srv/x", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("file:///srv2/x", |e| {
                matches!(e, SourceError::NotAllowed(_))
            }),
            ("https://git.exam\u{0440}le/org/x.git", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("https://git.example:0/org/x.git", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("https://git.example:99999/org/x.git", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
            ("https://git example/org", |e| {
                matches!(e, SourceError::Syntax { .. })
            }),
        ];
        for (u, want) in cases {
            let e = why(u);
            assert!(want(&e), "{u}: {e:?}");
        }
        // Messages never carry user-info.
        let e = why("https://u:s3cret@git.example/org/x.git").to_string();
        assert!(!e.contains("s3cret"), "{e}");
        assert_eq!(
            redact_url("https://u:s3cret@h/x"),
            "https://***@h/x".to_string()
        );
    }
}
