//! `${roost.…}` substitution (`policy.substitute`). A textual pass over each manifest file finds
//! every variable (honouring `$${` escapes) and names the first it cannot resolve with its file
//! and line; then the values are inserted into the parsed documents, inside string scalars only
//! (keys and values), and the documents are written back, so a value is always one string,
//! never YAML structure. An inserted value is never scanned again: a value holding `${…}` stays
//! literal, so a loop cannot happen. Nothing is ever executed.
//!
//! Forms: `${roost.store}`, `${roost.labels.KEY}`, `${roost.vars.KEY}`,
//! `${roost.vars.KEY:=default}`; `$${` is a literal `${`. Any other `${` is an error.

use serde_json::Value;

use super::StoreContext;
use crate::git::{is_manifest, parse_documents, write_documents, GitError, ManifestFile};

/// Most vars a store may have (the contract's limit, as the inventory and profile check it).
pub use roost_schemas::inventory::MAX_VARS;
/// Longest value of a var or label, and longest default (bytes).
pub use roost_schemas::inventory::MAX_VAR_BYTES as MAX_VALUE_BYTES;
/// Most labels a store may have.
pub use roost_schemas::selector::MAX_LABELS;
/// Longest key of a var or label (a Kubernetes label key with its prefix).
const MAX_KEY_BYTES: usize = 253;

/// Why a revision cannot be substituted for this store. Messages name variables, files and
/// lines, never a value, and never text of a sealed file.
#[derive(Debug, thiserror::Error)]
pub enum SubstituteError {
    /// A variable the store has no value (and the token no default) for.
    #[error("{at}: unresolved variable ${{{var}}}")]
    Unresolved {
        /// Where.
        at: At,
        /// The variable, e.g. `roost.vars.printer_ip`.
        var: String,
    },
    /// A `${` that is not a roost variable (unknown namespace, bad key, nested, unterminated).
    #[error("{at}: {why} (write $${{ for a literal ${{)")]
    Malformed {
        /// Where.
        at: At,
        /// What is wrong.
        why: String,
    },
    /// The store's context is beyond the limits.
    #[error("store context: {0}")]
    Context(String),
    /// The inserted values make the revision larger than the agent's render limits.
    #[error("{file}: substituted values exceed {limit} bytes (limits.max_render_bytes)")]
    TooLarge {
        /// The file being substituted when the limit was passed.
        file: String,
        /// The limit.
        limit: u64,
    },
    /// A substituted document cannot be written back (two keys became the same).
    #[error("{file}: {why}")]
    Document {
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },
    /// The file does not parse.
    #[error("substituting")]
    Parse(#[source] GitError),
}

/// Where a variable is: a file and line (from the textual pass), or a file alone for a
/// variable only the parsed value shows (written with YAML escapes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    /// The file.
    pub file: String,
    /// The line (1-based).
    pub line: Option<usize>,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}", self.file),
            None => write!(f, "{} (in a value)", self.file),
        }
    }
}

/// A variable of the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var<'a> {
    Store,
    Label(&'a str),
    Vars {
        key: &'a str,
        default: Option<&'a str>,
    },
}

impl<'a> Var<'a> {
    /// The variable's name, as in messages (without a default).
    fn name(&self) -> String {
        match self {
            Var::Store => "roost.store".into(),
            Var::Label(k) => format!("roost.labels.{k}"),
            Var::Vars { key, .. } => format!("roost.vars.{key}"),
        }
    }

    /// The store's value, or the default; None when it has neither.
    fn resolve<'c>(&self, ctx: &'c StoreContext) -> Option<&'c str>
    where
        'a: 'c,
    {
        match *self {
            Var::Store => Some(&ctx.store),
            Var::Label(k) => ctx.labels.get(k).map(String::as_str),
            Var::Vars { key, default } => ctx.vars.get(key).map(String::as_str).or(default),
        }
    }
}

/// A piece of text: literal text (a `$${` escape is the literal `${`) or a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Escape,
    Var(Var<'a>),
}

/// A malformed `${`: where it starts (byte offset) and what is wrong. `token` is the text of
/// the token, shown only for files that were not sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenError {
    offset: usize,
    why: &'static str,
    token: String,
}

/// The pieces of a text, in order, up to the first malformed token.
struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str) -> Scanner<'a> {
        Scanner { text, pos: 0 }
    }

    fn token(&mut self) -> Result<(usize, Piece<'a>), TokenError> {
        let start = self.pos;
        let body_start = start + 2;
        let rest = &self.text[body_start..];
        let err = |why, end: usize| TokenError {
            offset: start,
            why,
            token: self.text[start..end].chars().take(80).collect(),
        };
        let line_end = rest.find('\n').map_or(self.text.len(), |i| body_start + i);
        let Some(close) = rest.find('}').map(|i| body_start + i) else {
            return Err(err("unterminated ${", line_end));
        };
        if close > line_end {
            return Err(err(
                "unterminated ${ (a variable ends on its line)",
                line_end,
            ));
        }
        let body = &self.text[body_start..close];
        if body.contains("${") {
            return Err(err("nested ${ inside a variable", close + 1));
        }
        if body.len() > MAX_VALUE_BYTES + 64 {
            return Err(err("variable longer than its limit", close + 1));
        }
        let var = parse_var(body).map_err(|why| err(why, close + 1))?;
        self.pos = close + 1;
        Ok((start, Piece::Var(var)))
    }
}

impl<'a> Iterator for Scanner<'a> {
    type Item = Result<(usize, Piece<'a>), TokenError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.text[self.pos..];
        let first = rest.chars().next()?.len_utf8();
        if rest.starts_with("$${") {
            let at = self.pos;
            self.pos += 3;
            return Some(Ok((at, Piece::Escape)));
        }
        if rest.starts_with("${") {
            let r = self.token();
            if r.is_err() {
                self.pos = self.text.len();
            }
            return Some(r);
        }
        // Literal text up to the next `$` ('$' is ASCII: a char boundary).
        let end = rest[first..].find('$').map_or(rest.len(), |i| i + first);
        let at = self.pos;
        self.pos += end;
        Some(Ok((at, Piece::Text(&rest[..end]))))
    }
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_KEY_BYTES
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
}

/// Parses the inside of `${…}`.
fn parse_var(body: &str) -> Result<Var<'_>, &'static str> {
    if body == "roost.store" {
        return Ok(Var::Store);
    }
    if let Some(rest) = body.strip_prefix("roost.labels.") {
        if rest.contains(":=") {
            return Err("a default (:=) is allowed for roost.vars only");
        }
        return valid_key(rest)
            .then_some(Var::Label(rest))
            .ok_or("not a label key (letters, digits, . _ / -)");
    }
    if let Some(rest) = body.strip_prefix("roost.vars.") {
        let (key, default) = match rest.split_once(":=") {
            Some((k, d)) => (k, Some(d)),
            None => (rest, None),
        };
        if default.is_some_and(|d| d.len() > MAX_VALUE_BYTES) {
            return Err("default longer than 4096 bytes");
        }
        return valid_key(key)
            .then_some(Var::Vars { key, default })
            .ok_or("not a var key (letters, digits, . _ / -)");
    }
    if body.starts_with("roost.") {
        return Err("unknown variable (roost.store, roost.labels.KEY, roost.vars.KEY)");
    }
    Err("not a roost variable (roost.store, roost.labels.KEY, roost.vars.KEY)")
}

/// Checks the store's context against the limits (vars, labels, value sizes).
pub fn check_context(ctx: &StoreContext) -> Result<(), SubstituteError> {
    if ctx.vars.len() > MAX_VARS {
        return Err(SubstituteError::Context(format!(
            "{} vars, at most {MAX_VARS}",
            ctx.vars.len()
        )));
    }
    if ctx.labels.len() > MAX_LABELS {
        return Err(SubstituteError::Context(format!(
            "{} labels, at most {MAX_LABELS}",
            ctx.labels.len()
        )));
    }
    for (kind, map) in [("var", &ctx.vars), ("label", &ctx.labels)] {
        if let Some((k, v)) = map.iter().find(|(_, v)| v.len() > MAX_VALUE_BYTES) {
            return Err(SubstituteError::Context(format!(
                "{kind} {k:?}: {} bytes, at most {MAX_VALUE_BYTES}",
                v.len()
            )));
        }
    }
    Ok(())
}

/// How many bytes inserted values may still add (the revision's render budget).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    left: u64,
    limit: u64,
}

impl Budget {
    /// `limit` bytes of output in all, of which `used` are taken by the files as they are.
    pub fn new(limit: u64, used: u64) -> Budget {
        Budget {
            left: limit.saturating_sub(used),
            limit,
        }
    }

    fn take(&mut self, n: usize, file: &str) -> Result<(), SubstituteError> {
        self.left = self
            .left
            .checked_sub(n as u64)
            .ok_or_else(|| SubstituteError::TooLarge {
                file: file.to_owned(),
                limit: self.limit,
            })?;
        Ok(())
    }
}

/// One file's substitution: its name, whether it was sealed (its text stays out of messages)
/// and the context.
struct Job<'a> {
    file: &'a str,
    sealed: bool,
    ctx: &'a StoreContext,
}

impl Job<'_> {
    fn malformed(&self, text: &str, e: TokenError, textual: bool) -> SubstituteError {
        let line = textual.then(|| line_of(text, e.offset));
        let why = if self.sealed {
            e.why.to_owned()
        } else {
            format!("{}: {}", e.why, e.token)
        };
        SubstituteError::Malformed {
            at: At {
                file: self.file.to_owned(),
                line,
            },
            why,
        }
    }

    fn unresolved(&self, var: &Var<'_>, line: Option<usize>) -> SubstituteError {
        SubstituteError::Unresolved {
            at: At {
                file: self.file.to_owned(),
                line,
            },
            var: var.name(),
        }
    }

    /// The textual pass: every variable of the file resolves; true when there is anything to
    /// substitute (a variable or an escape).
    fn check_text(&self, text: &str) -> Result<bool, SubstituteError> {
        let mut found = false;
        for piece in Scanner::new(text) {
            match piece.map_err(|e| self.malformed(text, e, true))? {
                (_, Piece::Text(_)) => {}
                (_, Piece::Escape) => found = true,
                (at, Piece::Var(v)) => {
                    if v.resolve(self.ctx).is_none() {
                        return Err(self.unresolved(&v, Some(line_of(text, at))));
                    }
                    found = true;
                }
            }
        }
        Ok(found)
    }

    /// `s` with its variables replaced, in one pass (an inserted value is not scanned
    /// again); None when it has none.
    fn expand(&self, s: &str, budget: &mut Budget) -> Result<Option<String>, SubstituteError> {
        if !s.contains("${") {
            return Ok(None);
        }
        let mut out = String::with_capacity(s.len());
        for piece in Scanner::new(s) {
            match piece.map_err(|e| self.malformed(s, e, false))? {
                (_, Piece::Text(t)) => out.push_str(t),
                (_, Piece::Escape) => out.push_str("${"),
                (_, Piece::Var(v)) => {
                    let value = v
                        .resolve(self.ctx)
                        .ok_or_else(|| self.unresolved(&v, None))?;
                    budget.take(value.len(), self.file)?;
                    out.push_str(value);
                }
            }
        }
        Ok(Some(out))
    }

    /// Substitutes inside every string of `v` (keys too); true when something changed.
    fn value(&self, v: &mut Value, budget: &mut Budget) -> Result<bool, SubstituteError> {
        match v {
            Value::String(s) => match self.expand(s, budget)? {
                Some(new) => {
                    *s = new;
                    Ok(true)
                }
                None => Ok(false),
            },
            Value::Array(items) => {
                let mut changed = false;
                for item in items {
                    changed |= self.value(item, budget)?;
                }
                Ok(changed)
            }
            Value::Object(map) => {
                let mut changed = false;
                let mut out = serde_json::Map::with_capacity(map.len());
                for (k, mut item) in std::mem::take(map) {
                    changed |= self.value(&mut item, budget)?;
                    let key = match self.expand(&k, budget)? {
                        Some(new) => {
                            changed = true;
                            new
                        }
                        None => k,
                    };
                    if out.contains_key(&key) {
                        return Err(SubstituteError::Document {
                            file: self.file.to_owned(),
                            why: if self.sealed {
                                "two keys of a mapping are the same after substitution".into()
                            } else {
                                format!("two keys of a mapping become {key:?}")
                            },
                        });
                    }
                    out.insert(key, item);
                }
                *map = out;
                Ok(changed)
            }
            _ => Ok(false),
        }
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Substitutes one file for the store: `None` when it is not a manifest or has nothing to
/// substitute (its bytes stay as they are), else its new content. `sealed`: the file was
/// decrypted, so no message quotes its text.
pub fn substitute_file(
    f: &ManifestFile,
    ctx: &StoreContext,
    sealed: bool,
    budget: &mut Budget,
) -> Result<Option<Vec<u8>>, SubstituteError> {
    if !is_manifest(&f.path) {
        return Ok(None);
    }
    // Parsing first checks UTF-8, NUL and syntax (a decrypted file was not checked yet).
    let mut docs = parse_documents(f).map_err(SubstituteError::Parse)?;
    let text = String::from_utf8_lossy(&f.data);
    let job = Job {
        file: &f.path,
        sealed,
        ctx,
    };
    if !job.check_text(&text)? {
        return Ok(None);
    }
    let mut changed = false;
    for d in &mut docs {
        changed |= job.value(d, budget)?;
    }
    if !changed {
        // Variables only in comments: the file stays as it is.
        return Ok(None);
    }
    write_documents(&f.path, &docs)
        .map(Some)
        .ok_or_else(|| SubstituteError::Document {
            file: f.path.clone(),
            why: "the substituted documents cannot be written back".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ctx() -> StoreContext {
        StoreContext {
            store: "store-0042".into(),
            groups: vec!["canary".into()],
            labels: BTreeMap::from([
                ("region".into(), "us-south".into()),
                ("app.kubernetes.io/tier".into(), "edge".into()),
            ]),
            vars: BTreeMap::from([
                ("store_number".into(), "0042".into()),
                (
                    "evil".into(),
                    "x\n  evil: true\n- [1]\n---\nkind: Secret".into(),
                ),
                ("loop_a".into(), "${roost.vars.loop_b}".into()),
                ("loop_b".into(), "${roost.vars.loop_a}".into()),
                ("port".into(), "8080".into()),
                ("yes".into(), "true".into()),
            ]),
            timezone: None,
        }
    }

    fn file(path: &str, text: &str) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            data: text.as_bytes().to_vec(),
        }
    }

    fn big() -> Budget {
        Budget::new(1 << 20, 0)
    }

    /// The documents of `text` in `path` after substitution.
    fn run(path: &str, text: &str) -> Result<Vec<Value>, SubstituteError> {
        let f = file(path, text);
        let out = substitute_file(&f, &ctx(), false, &mut big())?;
        let data = out.unwrap_or(f.data);
        Ok(
            parse_documents(&file(path, std::str::from_utf8(&data).expect("utf8")))
                .expect("parses"),
        )
    }

    fn err(path: &str, text: &str) -> String {
        run(path, text).expect_err(text).to_string()
    }

    #[test]
    fn every_form_resolves_as_a_string() {
        let docs = run(
            "cm.yaml",
            "kind: ConfigMap\nmetadata:\n  name: web-${roost.store}\ndata:\n  store: ${roost.store}\n  region: \"${roost.labels.region}\"\n  tier: ${roost.labels.app.kubernetes.io/tier}\n  number: '${roost.vars.store_number}'\n  printer: ${roost.vars.printer_ip:=10.0.0.1}\n  empty: \"${roost.vars.none:=}\"\n  mixed: a-${roost.store}-b-${roost.vars.store_number}\n  port: ${roost.vars.port}\n  flag: ${roost.vars.yes}\n",
        )
        .expect("substitutes");
        let d = &docs[0];
        assert_eq!(d["metadata"]["name"], "web-store-0042");
        assert_eq!(d["data"]["store"], "store-0042");
        assert_eq!(d["data"]["region"], "us-south");
        assert_eq!(d["data"]["tier"], "edge");
        assert_eq!(d["data"]["number"], "0042", "a string, not the number 42");
        assert_eq!(d["data"]["printer"], "10.0.0.1");
        assert_eq!(d["data"]["empty"], "");
        assert_eq!(d["data"]["mixed"], "a-store-0042-b-0042");
        assert_eq!(d["data"]["port"], "8080", "a string, never an integer");
        assert_eq!(d["data"]["flag"], "true", "a string, never a boolean");
        // JSON files are substituted too, and keys.
        let docs = run(
            "x.json",
            r#"{"kind": "ConfigMap", "data": {"k-${roost.store}": "${roost.labels.region}"}}"#,
        )
        .expect("json");
        assert_eq!(docs[0]["data"]["k-store-0042"], "us-south");
    }

    #[test]
    fn escapes_stay_literal() {
        let docs = run(
            "cm.yaml",
            "data:\n  a: $${roost.store}\n  b: \"$${HOME} and ${roost.store}\"\n  c: $$x $ {y} $\n  d: $$${roost.store}\n",
        )
        .expect("escapes");
        assert_eq!(docs[0]["data"]["a"], "${roost.store}");
        assert_eq!(docs[0]["data"]["b"], "${HOME} and store-0042");
        assert_eq!(docs[0]["data"]["c"], "$$x $ {y} $", "only $${{ is special");
        assert_eq!(docs[0]["data"]["d"], "$${roost.store}");
    }

    #[test]
    fn unresolved_and_malformed_name_the_variable_the_file_and_the_line() {
        let e = err(
            "apps/web/cm.yaml",
            "kind: A\ndata:\n  x: ${roost.vars.printer_ip}\n",
        );
        assert_eq!(
            e,
            "apps/web/cm.yaml:3: unresolved variable ${roost.vars.printer_ip}"
        );
        let e = err("cm.yaml", "a: ${roost.labels.missing}\n");
        assert!(
            e.contains("cm.yaml:1: unresolved variable ${roost.labels.missing}"),
            "{e}"
        );
        // The first unresolved one is named, also when it is in a comment.
        let e = err(
            "cm.yaml",
            "a: 1\n# ${roost.vars.one}\nb: ${roost.vars.two}\n",
        );
        assert!(
            e.contains(":2: unresolved variable ${roost.vars.one}"),
            "{e}"
        );
        for (text, line, why) in [
            ("a: ${roost.foo}\n", 1, "unknown variable"),
            ("a: 1\nb: ${HOME}\n", 2, "not a roost variable"),
            ("a: ${}\n", 1, "not a roost variable"),
            ("a: ${roost.vars.${roost.store}}\n", 1, "nested"),
            ("a: \"${roost.store\"\nb: x}\n", 1, "unterminated"),
            ("a: ${roost.store\n", 1, "unterminated"),
            ("a: ${roost.vars.a b}\n", 1, "not a var key"),
            ("a: ${roost.vars.}\n", 1, "not a var key"),
            ("a: ${roost.labels.region:=x}\n", 1, "default"),
            ("a: ${roost.store:=x}\n", 1, "unknown variable"),
        ] {
            let e = err("cm.yaml", text);
            assert!(e.starts_with(&format!("cm.yaml:{line}: ")), "{text}: {e}");
            assert!(e.contains(why), "{text}: {e}");
            assert!(e.contains("$${"), "says how to write a literal: {e}");
        }
        // A sealed file's text stays out of the message; the variable name is still given.
        let f = file("secret.yaml", "stringData:\n  password: \"ab${cd}ef\"\n");
        let e = substitute_file(&f, &ctx(), true, &mut big())
            .expect_err("malformed")
            .to_string();
        assert!(e.starts_with("secret.yaml:2: "), "{e}");
        assert!(!e.contains("cd"), "no secret text: {e}");
    }

    #[test]
    fn a_value_never_becomes_structure() {
        let text = "kind: ConfigMap\ndata:\n  v: ${roost.vars.evil}\n  w: \"${roost.vars.evil}\"\n  list: [\"${roost.vars.evil}\"]\n";
        let docs = run("cm.yaml", text).expect("substitutes");
        assert_eq!(docs.len(), 1, "no new document");
        let want = ctx().vars["evil"].clone();
        assert_eq!(docs[0]["data"]["v"], want.as_str());
        assert_eq!(docs[0]["data"]["w"], want.as_str());
        assert_eq!(docs[0]["data"]["list"][0], want.as_str());
        assert!(docs[0].get("evil").is_none() && docs[0]["data"].get("evil").is_none());
        assert_eq!(docs[0]["data"].as_object().expect("map").len(), 3);
        // And in JSON.
        let docs = run("x.json", r#"{"v": "${roost.vars.evil}"}"#).expect("json");
        assert_eq!(docs[0]["v"], want.as_str());
        assert_eq!(docs[0].as_object().expect("map").len(), 1);
    }

    #[test]
    fn inserted_values_are_never_scanned_again() {
        // loop_a's value names loop_b, whose value names loop_a: one pass, literal text.
        let docs = run(
            "cm.yaml",
            "a: ${roost.vars.loop_a}\nb: ${roost.vars.loop_b}\n",
        )
        .expect("no loop");
        assert_eq!(docs[0]["a"], "${roost.vars.loop_b}");
        assert_eq!(docs[0]["b"], "${roost.vars.loop_a}");
        // A default is literal text too.
        let docs = run("cm.yaml", "a: ${roost.vars.none:=$x}\n").expect("default");
        assert_eq!(docs[0]["a"], "$x");
    }

    #[test]
    fn files_without_variables_and_other_files_keep_their_bytes() {
        let c = ctx();
        for (path, text) in [
            ("cm.yaml", "# a comment\nkey:   value   # kept as written\n"),
            ("run.sh", "echo ${HOME} ${roost.nothing\n"),
            ("cm.yaml", "a: 1\n# ${roost.store} only in a comment\n"),
        ] {
            let f = file(path, text);
            assert_eq!(
                substitute_file(&f, &c, false, &mut big()).expect(path),
                None,
                "{text}"
            );
        }
    }

    #[test]
    fn limits_are_enforced() {
        let mut c = ctx();
        assert!(check_context(&c).is_ok());
        for i in 0..100_000 {
            c.vars.insert(format!("v{i}"), "x".into());
        }
        let e = check_context(&c).expect_err("too many").to_string();
        assert!(e.contains("100006 vars, at most 256"), "{e}");
        let mut c = ctx();
        c.vars
            .insert("huge".into(), "x".repeat(MAX_VALUE_BYTES + 1));
        let e = check_context(&c).expect_err("too long").to_string();
        assert!(e.contains("\"huge\"") && e.contains("4097 bytes"), "{e}");
        assert!(!e.contains("xxxx"), "no value in the message: {e}");
        let mut c = ctx();
        c.labels = (0..=MAX_LABELS)
            .map(|i| (format!("l{i}"), "v".into()))
            .collect();
        assert!(check_context(&c).is_err());
        // Inserted values count against the render budget: 4 KiB × 300 does not fit in 1 MiB
        // minus the file.
        let mut c = ctx();
        c.vars.insert("big".into(), "y".repeat(MAX_VALUE_BYTES));
        let text = "a:\n".to_owned() + &"  - ${roost.vars.big}\n".repeat(300);
        let f = file("big.yaml", &text);
        let mut budget = Budget::new(1 << 20, f.data.len() as u64);
        let e = substitute_file(&f, &c, false, &mut budget).expect_err("too large");
        assert!(matches!(e, SubstituteError::TooLarge { .. }), "{e}");
        let mut budget = Budget::new(2 << 20, f.data.len() as u64);
        assert!(substitute_file(&f, &c, false, &mut budget)
            .expect("fits")
            .is_some());
        // A token longer than any value is refused without being read as a var.
        let long = format!(
            "a: ${{roost.vars.k:={}}}\n",
            "z".repeat(MAX_VALUE_BYTES + 1)
        );
        assert!(err("cm.yaml", &long).contains("longer"));
    }

    #[test]
    fn keys_that_collide_after_substitution_are_refused() {
        let e = err("cm.yaml", "data:\n  store-0042: a\n  ${roost.store}: b\n");
        assert!(e.contains("two keys"), "{e}");
    }

    #[test]
    fn scanner_never_panics_on_any_text() {
        for text in [
            "$",
            "${",
            "$${",
            "$$$",
            "é${",
            "${é}",
            "a$é$",
            "${roost.vars.é}",
            "$\u{1F600}{",
        ] {
            let _: Vec<_> = Scanner::new(text).collect();
            let _ = run("x.yaml", &format!("a: \"{}\"\n", text.replace('"', "")));
        }
    }
}

#[cfg(test)]
mod props {
    //! Properties: any text substitutes or fails cleanly, and any value comes back as exactly
    //! one string, whatever characters it holds.
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ctx(value: &str) -> StoreContext {
        StoreContext {
            store: "s1".into(),
            vars: BTreeMap::from([("x".into(), value.to_owned())]),
            labels: BTreeMap::from([("y".into(), "v".into())]),
            ..StoreContext::default()
        }
    }

    /// The documents of `text` (a YAML file) after substitution with var `x` = `value`.
    fn substitute(text: &str, value: &str) -> Result<Vec<Value>, SubstituteError> {
        let f = ManifestFile {
            path: "p.yaml".into(),
            data: text.as_bytes().to_vec(),
        };
        let out = substitute_file(&f, &ctx(value), false, &mut Budget::new(1 << 20, 0))?;
        let f = ManifestFile {
            data: out.unwrap_or(f.data),
            ..f
        };
        Ok(parse_documents(&f).expect("written back documents parse"))
    }

    const TEMPLATE: &str = "a: ${roost.vars.x}\nb: \"${roost.vars.x}\"\nc: ['k-${roost.vars.x}']\n";

    fn check(docs: &[Value], value: &str) -> Result<(), TestCaseError> {
        prop_assert_eq!(docs.len(), 1);
        let d = &docs[0];
        prop_assert_eq!(d.as_object().map(|m| m.len()), Some(3), "no key added");
        prop_assert_eq!(d["a"].as_str(), Some(value));
        prop_assert_eq!(d["b"].as_str(), Some(value));
        prop_assert_eq!(d["c"].as_array().map(Vec::len), Some(1));
        let prefixed = format!("k-{value}");
        prop_assert_eq!(d["c"][0].as_str(), Some(prefixed.as_str()));
        Ok(())
    }

    proptest! {
        #[test]
        fn any_text_substitutes_or_fails_cleanly(
            text in "([a-z: \n\"'\\[\\]{},-]|\\$|\\$\\{|\\$\\$\\{|\\}|roost\\.store|roost\\.vars\\.x|roost\\.labels\\.y|:=){0,120}"
        ) {
            let _ = substitute(&text, "x\n  evil: true");
        }

        #[test]
        fn a_printable_value_is_always_exactly_one_string(value in "[ -~\n\t]{0,200}") {
            let docs = substitute(TEMPLATE, &value).expect("substitutes");
            check(&docs, &value)?;
        }

        #[test]
        fn any_value_is_one_string_or_refused(value in "\\PC{0,60}|[\\x00-\\x1f\\x7f\\u{85}\\u{feff}\\u{2028}]{0,8}") {
            match substitute(TEMPLATE, &value) {
                Ok(docs) => check(&docs, &value)?,
                Err(e) => prop_assert!(matches!(e, SubstituteError::Document { .. }), "{}", e),
            }
        }
    }
}
