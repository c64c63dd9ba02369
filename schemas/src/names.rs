//! Name rules for stores, groups and deployments: DNS-label-like, `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`.

/// Why a name is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: must match ^[a-z0-9]([a-z0-9-]{{0,61}}[a-z0-9])?$")]
pub struct NameError {
    /// The rejected name.
    pub name: String,
}

/// Checks a store, group or deployment name against the contract's pattern.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let b = name.as_bytes();
    let ok_inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let ok_edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = !b.is_empty()
        && b.len() <= 63
        && ok_edge(&b[0])
        && ok_edge(&b[b.len() - 1])
        && b.iter().all(ok_inner);
    if valid {
        Ok(())
    } else {
        Err(NameError {
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "store-0042", "kitchen-display", "0", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            &"a".repeat(64),
            "a/b",
            "+",
            "#",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
