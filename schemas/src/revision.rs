//! How a revision is shown to people: the first 12 characters of its commit id.

use std::fmt;

/// The short form of a commit id (its first [`ShortRev::LEN`] characters) for tables, log
/// lines and branch names. Never panics: a shorter or odd string is shown whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShortRev<'a>(&'a str);

impl<'a> ShortRev<'a> {
    /// Characters shown.
    pub const LEN: usize = 12;

    /// The short form of `rev`.
    pub fn of(rev: &'a str) -> ShortRev<'a> {
        ShortRev(rev.get(..Self::LEN).unwrap_or(rev))
    }

    /// The short form as a string slice of `rev`.
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

impl fmt::Display for ShortRev<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::ShortRev;

    #[test]
    fn twelve_characters_or_the_whole_string() {
        let full = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(ShortRev::of(full).to_string(), "0123456789ab");
        assert_eq!(ShortRev::of("abc").as_str(), "abc");
        assert_eq!(ShortRev::of("").as_str(), "");
        // Not a character boundary at 12: shown whole instead of panicking.
        let odd = "aéééééé";
        assert_eq!(ShortRev::of(odd).as_str(), odd);
        assert_eq!(format!("{:>14}", ShortRev::of(full)), "  0123456789ab");
    }
}
