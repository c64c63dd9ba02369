//! The documentation's links resolve: every relative link and image in every Markdown file of
//! the repository points at a file or folder that exists, and every `#anchor` into a Markdown
//! file names one of its headings (GitHub's slugs). Links inside code are not links.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Folders never walked: build output, dependencies, Git's own data (`fuzz/target` included),
/// and `third_party/` (copies of published crates, whose documents link into their own
/// repositories).
const SKIP_DIRS: [&str; 4] = ["target", "node_modules", ".git", "third_party"];

/// A link found in a Markdown file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    /// 1-based line number.
    line: usize,
    /// The destination as written.
    dest: String,
}

/// A link that does not resolve.
#[derive(Debug)]
struct Broken {
    file: PathBuf,
    line: usize,
    dest: String,
    why: String,
}

/// GitHub's anchor for a heading's text: lowercase, spaces become `-`, every other character
/// that is not a letter, a digit, `-` or `_` is dropped. Inline code keeps its text, a link its
/// label.
fn slug(heading: &str) -> String {
    let text = strip_inline_links(heading);
    let mut out = String::new();
    for c in text.trim().chars().flat_map(char::to_lowercase) {
        if c == ' ' {
            out.push('-');
        } else if c.is_alphanumeric() || c == '-' || c == '_' {
            out.push(c);
        }
    }
    out
}

/// `[label](dest)` → `label`, for heading text.
fn strip_inline_links(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|i| open + i) else {
            break;
        };
        let Some(end) = rest[close + 2..].find(')').map(|i| close + 2 + i) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The opening fence of a fenced code block (``` or ~~~, three or more), if `line` is one.
fn fence(line: &str) -> Option<(char, usize)> {
    let t = line.trim_start();
    let c = t.chars().next()?;
    if c != '`' && c != '~' {
        return None;
    }
    let n = t.chars().take_while(|&x| x == c).count();
    // A backtick fence's info string has no backticks (```x``` is inline code).
    let info_ok = c == '~' || !t[n..].contains('`');
    (n >= 3 && info_ok).then_some((c, n))
}

/// The lines of a Markdown text that are outside fenced code blocks, with their 1-based
/// numbers.
fn prose_lines(markdown: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut open: Option<(char, usize)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match (open, fence(line)) {
            (None, Some(f)) => open = Some(f),
            (Some((c, n)), Some((c2, n2))) if c == c2 && n2 >= n && is_bare_fence(line, c) => {
                open = None
            }
            (None, None) => out.push((i + 1, line)),
            _ => {}
        }
    }
    out
}

/// A closing fence has nothing after its fence characters.
fn is_bare_fence(line: &str, c: char) -> bool {
    line.trim().chars().all(|x| x == c)
}

/// A line with its inline code spans blanked out (a backtick run closes only with a run of the
/// same length), so that a link written as code is not taken for a link.
fn without_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&c| c == '`').count();
        let mut j = i + run;
        let mut closed = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let r = chars[j..].iter().take_while(|&&c| c == '`').count();
                if r == run {
                    closed = Some(j + r);
                    break;
                }
                j += r;
            } else {
                j += 1;
            }
        }
        match closed {
            Some(end) => {
                out.extend(std::iter::repeat_n(' ', end - i));
                i = end;
            }
            None => {
                out.extend(&chars[i..i + run]);
                i += run;
            }
        }
    }
    out
}

/// The destination that starts right after `](`: `<…>`, or up to white space or the `)` that
/// closes the link (balanced parentheses inside are allowed).
fn destination(after: &str) -> Option<String> {
    let after = after.trim_start();
    if let Some(rest) = after.strip_prefix('<') {
        return rest.find('>').map(|end| rest[..end].to_owned());
    }
    let mut depth = 0usize;
    for (i, c) in after.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some(after[..i].to_owned()),
            ')' => depth -= 1,
            c if c.is_whitespace() => return Some(after[..i].to_owned()),
            _ => {}
        }
    }
    None
}

/// Every inline link and image (`[text](dest)`, `![alt](dest)`) and every reference definition
/// (`[label]: dest`) outside code.
fn links(markdown: &str) -> Vec<Link> {
    let mut out = Vec::new();
    for (line, raw) in prose_lines(markdown) {
        let text = without_code_spans(raw);
        let t = text.trim_start();
        if t.starts_with('[') {
            if let Some(close) = t.find("]:") {
                if !t[..close].contains('(') {
                    if let Some(dest) = t[close + 2..].split_whitespace().next() {
                        out.push(Link {
                            line,
                            dest: dest.trim_matches(['<', '>']).to_owned(),
                        });
                        continue;
                    }
                }
            }
        }
        let mut from = 0;
        while let Some(pos) = text[from..].find("](").map(|p| from + p) {
            if text[..pos].contains('[') {
                if let Some(dest) = destination(&text[pos + 2..]) {
                    if !dest.is_empty() {
                        out.push(Link { line, dest });
                    }
                }
            }
            from = pos + 2;
        }
    }
    out
}

/// The anchors of a Markdown text's headings (ATX `# …` and setext), with GitHub's `-1`,
/// `-2`, … for repeated slugs.
fn anchors(markdown: &str) -> HashSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = HashSet::new();
    let mut add = |text: &str| {
        let base = slug(text);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    };
    let lines = prose_lines(markdown);
    for (k, &(number, line)) in lines.iter().enumerate() {
        let t = line.trim_start();
        let hashes = t.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && line.len() - t.len() < 4 {
            let rest = &t[hashes..];
            if rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t') {
                add(rest.trim().trim_end_matches('#').trim_end());
                continue;
            }
        }
        // Setext: a text line directly followed by a line of `=` or `-` only.
        if let Some(&(next_number, next)) = lines.get(k + 1) {
            let u = next.trim();
            let underline =
                !u.is_empty() && (u.chars().all(|c| c == '=') || u.chars().all(|c| c == '-'));
            if next_number == number + 1
                && underline
                && !t.is_empty()
                && !t.starts_with(['-', '*', '+', '|', '>'])
            {
                add(t.trim());
            }
        }
    }
    out
}

/// `%20` and friends in a path.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let (b'%', Some(b)) = (bytes[i], hex) {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a destination leaves the repository (`https:`, `mailto:`, any URL scheme).
fn is_external(dest: &str) -> bool {
    let Some(colon) = dest.find(':') else {
        return false;
    };
    let scheme = &dest[..colon];
    !scheme.is_empty()
        && scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Checks the links of `files` (Markdown files under `root`); returns the broken ones.
fn broken_links(root: &Path, files: &[PathBuf]) -> Vec<Broken> {
    let mut broken = Vec::new();
    let mut headings: BTreeMap<PathBuf, HashSet<String>> = BTreeMap::new();
    let mut anchors_of = |path: &Path| -> Option<HashSet<String>> {
        if let Some(a) = headings.get(path) {
            return Some(a.clone());
        }
        let text = std::fs::read_to_string(path).ok()?;
        let a = anchors(&text);
        headings.insert(path.to_owned(), a.clone());
        Some(a)
    };
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                broken.push(Broken {
                    file: file.clone(),
                    line: 0,
                    dest: String::new(),
                    why: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        let dir = file.parent().unwrap_or(root);
        for link in links(&text) {
            if is_external(&link.dest) {
                continue;
            }
            let (path_part, anchor) = match link.dest.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.dest.as_str(), None),
            };
            let path_part = path_part.split('?').next().unwrap_or_default();
            let target = if path_part.is_empty() {
                file.clone()
            } else if let Some(from_root) = path_part.strip_prefix('/') {
                root.join(percent_decode(from_root))
            } else {
                dir.join(percent_decode(path_part))
            };
            let mut report = |why: String| {
                broken.push(Broken {
                    file: file.clone(),
                    line: link.line,
                    dest: link.dest.clone(),
                    why,
                })
            };
            if !target.exists() {
                report(format!("no such file or folder: {}", target.display()));
                continue;
            }
            let Some(anchor) = anchor.filter(|a| !a.is_empty()) else {
                continue;
            };
            if target.extension().and_then(|e| e.to_str()) != Some("md") {
                continue;
            }
            match anchors_of(&target) {
                Some(a) if a.contains(&anchor.to_lowercase()) => {}
                Some(_) => report(format!(
                    "no heading with the anchor #{anchor} in {}",
                    target.display()
                )),
                None => report(format!("cannot read {}", target.display())),
            }
        }
    }
    broken
}

/// Every `*.md` file under `dir`, sorted, skipping [`SKIP_DIRS`] and symbolic links.
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        let name = entry.file_name();
        if kind.is_dir() {
            if !SKIP_DIRS.iter().any(|s| name == *s) {
                markdown_files(&path, out);
            }
        } else if kind.is_file() && path.extension().and_then(|e| e.to_str()) == Some("md") {
            out.push(path);
        }
    }
}

fn repository_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = repository_root();
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    for must in ["README.md", "DEVELOPMENT.md", "docs/architecture.md"] {
        assert!(
            files.contains(&root.join(must)),
            "{must} not found among the Markdown files under {}",
            root.display()
        );
    }
    let broken = broken_links(&root, &files);
    let list: Vec<String> = broken
        .iter()
        .map(|b| {
            let file = b.file.strip_prefix(&root).unwrap_or(&b.file);
            format!("{}:{}: ({}) {}", file.display(), b.line, b.dest, b.why)
        })
        .collect();
    assert!(
        list.is_empty(),
        "{} broken link(s) in {} Markdown files:\n{}",
        list.len(),
        files.len(),
        list.join("\n")
    );
}

#[test]
fn the_readme_links_every_docs_page() {
    let root = repository_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    assert!(
        readme.lines().count() <= 200,
        "README.md has {} lines; the front door stays at most 200",
        readme.lines().count()
    );
    let linked: HashSet<String> = links(&readme)
        .into_iter()
        .map(|l| l.dest.split('#').next().unwrap_or_default().to_owned())
        .collect();
    let mut pages = Vec::new();
    markdown_files(&root.join("docs"), &mut pages);
    let mut wanted: Vec<String> = pages
        .iter()
        .filter_map(|p| p.strip_prefix(&root).ok())
        .map(|p| p.display().to_string())
        .collect();
    wanted.extend(
        ["DEVELOPMENT.md", "schemas/README.md", "bench/README.md"]
            .into_iter()
            .map(String::from),
    );
    let missing: Vec<&String> = wanted.iter().filter(|w| !linked.contains(*w)).collect();
    assert!(missing.is_empty(), "README.md does not link {missing:?}");
}

#[test]
fn slugs_are_githubs() {
    assert_eq!(slug("Delivery and durability"), "delivery-and-durability");
    assert_eq!(
        slug("Freshness: the signed fleet snapshot"),
        "freshness-the-signed-fleet-snapshot"
    );
    assert_eq!(slug("`roost status`"), "roost-status");
    assert_eq!(
        slug("The Git mirror: `roost git-serve`"),
        "the-git-mirror-roost-git-serve"
    );
    assert_eq!(slug("agent.toml"), "agenttoml");
    assert_eq!(slug("Ownership (Kubernetes)"), "ownership-kubernetes");
    assert_eq!(
        slug("snake_case and 2,000 stores"),
        "snake_case-and-2000-stores"
    );
    assert_eq!(slug("19:15–20:00 UTC"), "19152000-utc");
    assert_eq!(slug("See [the page](x.md) now"), "see-the-page-now");

    let a =
        anchors("# Title\n\n## Runs\n\n```\n# not a heading\n```\n\n## Runs\n\nSetext\n------\n");
    for want in ["title", "runs", "runs-1", "setext"] {
        assert!(a.contains(want), "{want} missing from {a:?}");
    }
    assert!(!a.contains("not-a-heading"), "{a:?}");
}

#[test]
fn links_are_found_outside_code_only() {
    let md = "\
See [the page](docs/a.md#part) and ![a picture](img/b.png \"title\").
A [link with (parens)](c_(d).md) and <https://example.com> and [web](https://x.dev).
`[not a link](code.md)` in a code span, and ``[nor](this.md)`` either.

```sh
echo [fenced](fenced.md)
```

~~~
[tilde](tilde.md)
~~~
[ref]: ../ref.md
[same file](#top)
";
    let got: Vec<(usize, String)> = links(md).into_iter().map(|l| (l.line, l.dest)).collect();
    let want: Vec<(usize, String)> = [
        (1, "docs/a.md#part"),
        (1, "img/b.png"),
        (2, "c_(d).md"),
        (2, "https://x.dev"),
        (12, "../ref.md"),
        (13, "#top"),
    ]
    .into_iter()
    .map(|(n, d)| (n, d.to_owned()))
    .collect();
    assert_eq!(got, want);
    assert!(is_external("https://x.dev") && is_external("mailto:a@b.c"));
    assert!(!is_external("docs/a.md") && !is_external("#top"));
}

#[test]
fn a_broken_link_is_reported_and_a_good_one_is_not() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let root = std::env::temp_dir().join(format!("roost-docs-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(root.join("docs")).expect("fixture dir");
    std::fs::create_dir_all(root.join("target")).expect("fixture dir");
    std::fs::write(
        root.join("README.md"),
        "# Top\n\n[good](docs/page.md#a-part) [good dir](docs/) [good self](#top)\n\
         [gone](docs/missing.md) [bad anchor](docs/page.md#no-such-part) [bad self](#nowhere)\n\
         `[code](not-checked.md)` [web](https://example.com/missing.md)\n",
    )
    .expect("fixture");
    std::fs::write(
        root.join("docs/page.md"),
        "# Page\n\n## A part\n\n[back](../README.md#top) [image](pic.png)\n",
    )
    .expect("fixture");
    std::fs::write(root.join("target/skipped.md"), "[skipped](nothing.md)\n").expect("fixture");

    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    assert_eq!(
        files,
        vec![root.join("README.md"), root.join("docs/page.md")]
    );
    let broken: Vec<(String, usize, String)> = broken_links(&root, &files)
        .into_iter()
        .map(|b| {
            let file = b
                .file
                .strip_prefix(&root)
                .unwrap_or(&b.file)
                .display()
                .to_string();
            (file, b.line, b.dest)
        })
        .collect();
    let _ = std::fs::remove_dir_all(&root);
    let want: Vec<(String, usize, String)> = [
        ("README.md", 4, "docs/missing.md"),
        ("README.md", 4, "docs/page.md#no-such-part"),
        ("README.md", 4, "#nowhere"),
        ("docs/page.md", 5, "pic.png"),
    ]
    .into_iter()
    .map(|(f, n, d)| (f.to_owned(), n, d.to_owned()))
    .collect();
    assert_eq!(broken, want);
}
