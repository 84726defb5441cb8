//! mailqueue configuration: the YAML model admins write, loading it, resolving secret references, validating every
//! rule at once with `FILE:LINE:COL` positions, and the JSON Schema editors use.

mod de;
pub mod model;
mod secrets;
mod summary;
mod tree;
mod validate;

pub use model::*;

use std::{
    fmt,
    path::{Path, PathBuf},
};

use tree::Problem;

/// One problem found in a configuration file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The dotted key path at that position (`queues[1].priority`), when there is one.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// A loaded, validated configuration and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Diagnostic>,
}

/// Reads, parses, resolves secrets of, and validates a configuration file.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Diagnostic {
            file: path.into(),
            line: 0,
            column: 0,
            field: None,
            message: format!("cannot read: {e}"),
        }])
    })?;
    load_str(path, &text)
}

/// Like [`load`], for text already read (`path` is used in messages and for relative secret files).
///
/// Passes: YAML syntax and duplicate keys (a syntax error stops here), then every type error (unknown
/// keys, wrong types, bad values), then secrets, then cross-field rules. All problems found are
/// returned together, sorted by position.
pub fn load_str(path: &Path, text: &str) -> Result<Loaded, ConfigErrors> {
    let (doc, duplicates) =
        tree::parse(text).map_err(|p| ConfigErrors(to_diagnostics(path, None, p)))?;
    let diagnostics = |problems: Vec<Problem>| to_diagnostics(path, Some(&doc), problems);
    if matches!(doc.root.kind, tree::Kind::Null) {
        let problem = (
            tree::Pos { line: 1, column: 1 },
            "the file is empty; expected at least `incoming_servers` and `queues`".into(),
        );
        return Err(ConfigErrors(diagnostics(vec![problem])));
    }
    let typed = de::from_tree::<Config>(&doc);
    let mut findings = validate::Findings {
        errors: duplicates,
        warnings: Vec::new(),
    };
    for (id, msg) in &typed.errors {
        let pos = doc.node(*id).map_or(doc.root.pos, |n| n.pos);
        findings.error(pos, type_message(doc.path(*id), msg));
    }
    let Some(mut config) = typed.value else {
        return Err(ConfigErrors(diagnostics(findings.errors)));
    };
    let base_dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    secrets::resolve(
        &mut config,
        &doc.root,
        &typed.poisoned,
        base_dir,
        &mut findings,
    );
    validate::validate(&config, &doc.root, &typed.poisoned, &mut findings);
    if !findings.errors.is_empty() {
        return Err(ConfigErrors(diagnostics(findings.errors)));
    }
    Ok(Loaded {
        config,
        warnings: diagnostics(findings.warnings),
    })
}

/// Problems with the file name and, when the document parsed, the key path at each position.
fn to_diagnostics(
    path: &Path,
    doc: Option<&tree::Doc>,
    mut problems: Vec<Problem>,
) -> Vec<Diagnostic> {
    problems.sort_by_key(|(pos, _)| *pos);
    problems.dedup();
    problems
        .into_iter()
        .map(|(pos, message)| Diagnostic {
            file: path.into(),
            line: pos.line,
            column: pos.column,
            field: doc.and_then(|d| d.path_at(pos)).map(str::to_owned),
            message,
        })
        .collect()
}

/// serde's wording, prefixed with the key path and phrased for people who write YAML, not Rust.
fn type_message(path: &str, msg: &str) -> String {
    const WORDS: [(&str, &str); 9] = [
        (
            "expected enum AfterFetch",
            "expected `seen`, `delete` or `{ move: FOLDER }`",
        ),
        ("unknown field", "unknown key"),
        ("expected u16", "expected an integer 0..=65535"),
        ("expected u32", "expected a whole number"),
        ("expected i32", "expected an integer"),
        ("expected a sequence", "expected a list"),
        ("invalid type: map", "invalid type: mapping"),
        ("invalid type: sequence", "invalid type: list"),
        (
            "invalid type: unit variant, expected newtype variant",
            "`move` needs a folder: `{ move: FOLDER }`",
        ),
    ];
    let mut msg = WORDS
        .iter()
        .fold(msg.to_string(), |m, (from, to)| m.replace(from, to));
    // "expected struct Queue" -> "expected a mapping"
    if let Some(i) = msg.find("expected struct ") {
        let rest = &msg[i + "expected struct ".len()..];
        let end = rest
            .find(|c: char| !c.is_alphanumeric())
            .unwrap_or(rest.len());
        msg = format!("{}expected a mapping{}", &msg[..i], &rest[end..]);
    }
    if path.is_empty() {
        msg
    } else {
        format!("{path}: {msg}")
    }
}

/// The JSON Schema of the configuration file.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Config)).expect("schema serializes")
}
