//! A position-carrying YAML tree: what every later pass uses to say *where* something is.
//!
//! serde-saphyr parses the text (syntax errors, aliases, merge keys, budgets against alias bombs) into
//! `Spanned` values; we copy them into [`Node`]s numbered in pre-order so errors can name a node by id.
//! serde-saphyr stops at the first duplicate key, so duplicates are found in a separate scan of the raw
//! parser events, which reports all of them.

use std::{collections::HashMap, fmt};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{
    DuplicateKeyPolicy, MessageFormatter, Spanned, UserMessageFormatter, granit_parser,
};

/// A 1-based line and column; `0:0` when unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

/// A problem with a position, before it is given a file name.
pub(crate) type Problem = (Pos, String);

#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// Pre-order number, unique within one parsed document.
    pub id: usize,
    pub pos: Pos,
    pub kind: Kind,
    /// The scalar as written (e.g. `0012` for the integer 12), so string fields get the user's spelling.
    pub raw: String,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// A scalar's text as a string field would see it; `None` for null and collections.
    pub fn text(&self) -> Option<&str> {
        match &self.kind {
            Kind::Str(s) => Some(s),
            Kind::Bool(_) | Kind::I64(_) | Kind::U64(_) | Kind::F64(_) => Some(&self.raw),
            _ => None,
        }
    }

    /// The value of `key` in a mapping (first occurrence).
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries()
            .iter()
            .find(|(k, _)| k.text() == Some(key))
            .map(|(_, v)| v)
    }

    /// The position of `key`'s value, else of this node.
    pub fn pos_of(&self, key: &str) -> Pos {
        self.get(key).map_or(self.pos, |n| n.pos)
    }

    /// The position of `key` itself, else of this node.
    pub fn key_pos(&self, key: &str) -> Pos {
        self.entries()
            .iter()
            .find(|(k, _)| k.text() == Some(key))
            .map_or(self.pos, |(k, _)| k.pos)
    }

    pub fn entries(&self) -> &[(Node, Node)] {
        match &self.kind {
            Kind::Map(e) => e,
            _ => &[],
        }
    }

    pub fn items(&self) -> &[Node] {
        match &self.kind {
            Kind::Seq(i) => i,
            _ => &[],
        }
    }
}

/// A parsed document: its root and, per node id, its dotted path (`queues[0].name`) and parent.
pub(crate) struct Doc {
    pub root: Node,
    paths: Vec<String>,
    parents: Vec<usize>,
}

impl Doc {
    fn new(root: Node) -> Self {
        let mut doc = Self {
            root,
            paths: Vec::new(),
            parents: Vec::new(),
        };
        let mut index = Vec::new();
        index_nodes(&doc.root, doc.root.id, String::new(), &mut index);
        for (id, parent, path) in index {
            set(&mut doc.paths, id, path);
            set(&mut doc.parents, id, parent);
        }
        doc
    }

    /// The dotted path of a node (keys map to their entry's path); empty for the root.
    pub fn path(&self, id: usize) -> &str {
        self.paths.get(id).map_or("", String::as_str)
    }

    /// The collection a node is in (a key's parent is its mapping); the root is its own parent.
    pub fn parent(&self, id: usize) -> usize {
        self.parents.get(id).copied().unwrap_or(self.root.id)
    }

    /// The dotted path of the outermost node at `pos` (a mapping rather than its first key), if any.
    pub fn path_at(&self, pos: Pos) -> Option<&str> {
        let id = find_at(&self.root, pos)?;
        Some(self.path(id)).filter(|p| !p.is_empty())
    }

    /// The node with this id (ids are pre-order, so this is a walk; documents are small).
    pub fn node(&self, id: usize) -> Option<&Node> {
        find(&self.root, id)
    }
}

fn find(node: &Node, id: usize) -> Option<&Node> {
    if node.id == id {
        return Some(node);
    }
    match &node.kind {
        Kind::Seq(items) => items.iter().find_map(|n| find(n, id)),
        Kind::Map(entries) => entries
            .iter()
            .find_map(|(k, v)| find(k, id).or_else(|| find(v, id))),
        _ => None,
    }
}

/// The id of the outermost node at `pos` (pre-order: a collection comes before its children).
fn find_at(node: &Node, pos: Pos) -> Option<usize> {
    if node.pos == pos {
        return Some(node.id);
    }
    match &node.kind {
        Kind::Seq(items) => items.iter().find_map(|n| find_at(n, pos)),
        Kind::Map(entries) => entries
            .iter()
            .find_map(|(k, v)| find_at(k, pos).or_else(|| find_at(v, pos))),
        _ => None,
    }
}

/// Collects (id, parent id, path) for `node` and everything below it.
fn index_nodes(node: &Node, parent: usize, path: String, out: &mut Vec<(usize, usize, String)>) {
    match &node.kind {
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                index_nodes(item, node.id, format!("{path}[{i}]"), out);
            }
        }
        Kind::Map(entries) => {
            for (k, v) in entries {
                let key = k.text().unwrap_or("?");
                let child = if path.is_empty() {
                    key.to_string()
                } else {
                    format!("{path}.{key}")
                };
                out.push((k.id, node.id, child.clone()));
                index_nodes(v, node.id, child, out);
            }
        }
        _ => {}
    }
    out.push((node.id, parent, path));
}

fn set<T: Clone + Default>(v: &mut Vec<T>, id: usize, value: T) {
    if v.len() <= id {
        v.resize(id + 1, T::default());
    }
    v[id] = value;
}

/// Parses `text` into a tree plus the duplicate keys found (all of them; the first occurrence is kept).
/// A YAML syntax error stops parsing: it is returned with any duplicates found before it.
pub(crate) fn parse(text: &str) -> Result<(Doc, Vec<Problem>), Vec<Problem>> {
    let mut duplicates = duplicate_keys(text);
    // Duplicates are reported from the scan; FirstWins lets the tree build so the rest can be checked.
    let options = serde_saphyr::options! {
        strict_booleans: true,
        duplicate_keys: DuplicateKeyPolicy::FirstWins,
        with_snippet: false,
    };
    match serde_saphyr::from_str_with_options::<Spanned<Raw>>(text, options) {
        Ok(raw) => {
            let mut next_id = 0;
            Ok((Doc::new(convert(raw, text, &mut next_id)), duplicates))
        }
        Err(e) => {
            duplicates.push((error_pos(&e), yaml_message(&e)));
            Err(duplicates)
        }
    }
}

fn error_pos(e: &serde_saphyr::Error) -> Pos {
    e.location().map_or(Pos::default(), |l| Pos {
        line: l.line() as usize,
        column: l.column() as usize,
    })
}

/// The parser's message without its location suffix or source snippet (a snippet could show a secret).
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let msg = UserMessageFormatter.format_message(e.without_snippet());
    let msg: String = msg
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("invalid YAML: {msg}")
}

/// Finds every repeated key in every mapping. Only scalar keys are compared; `<<` merge keys are skipped.
fn duplicate_keys(text: &str) -> Vec<Problem> {
    use granit_parser::{Event, Parser};

    /// One open collection: for mappings, whether the next node is a key, and the keys seen so far.
    enum Frame {
        Seq,
        Map {
            at_key: bool,
            seen: HashMap<String, usize>,
        },
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut problems = Vec::new();
    // Called when a node is complete; `key` is its text if it is a scalar.
    let mut done = |stack: &mut Vec<Frame>, key: Option<(&str, Pos)>| {
        if let Some(Frame::Map { at_key, seen }) = stack.last_mut() {
            if *at_key && let Some((k, pos)) = key.filter(|(k, _)| *k != "<<") {
                if let Some(first) = seen.get(k) {
                    problems.push((pos, format!("duplicate key `{k}` (first given on line {first}); a key may appear only once")));
                } else {
                    seen.insert(k.to_string(), pos.line);
                }
            }
            *at_key = !*at_key;
        }
    };
    for event in Parser::new_from_str(text) {
        let Ok((event, span)) = event else { break }; // syntax errors are reported by serde-saphyr
        let pos = Pos {
            line: span.start.line(),
            column: span.start.col() + 1,
        };
        match event {
            Event::Scalar(value, ..) => done(&mut stack, Some((&value, pos))),
            Event::Alias(_) => done(&mut stack, None),
            Event::SequenceStart(..) => stack.push(Frame::Seq),
            Event::MappingStart(..) => stack.push(Frame::Map {
                at_key: true,
                seen: HashMap::new(),
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                stack.pop();
                done(&mut stack, None);
            }
            _ => {}
        }
    }
    problems
}

/// What serde-saphyr hands us: a generic YAML value whose children carry their locations.
enum Raw {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<Raw>, Spanned<Raw>)>),
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Raw::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::I64(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::U64(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::F64(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.into()))
    }
    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Raw::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key()? {
            entries.push((key, map.next_value()?));
        }
        Ok(Raw::Map(entries))
    }
}

fn convert(raw: Spanned<Raw>, text: &str, next_id: &mut usize) -> Node {
    let id = *next_id;
    *next_id += 1;
    let at = raw.referenced;
    let pos = Pos {
        line: at.line() as usize,
        column: at.column() as usize,
    };
    // The source text of the *definition* (an alias's use site would read `*name`).
    let span = raw.defined.span();
    let source = span
        .byte_offset()
        .zip(span.byte_len())
        .and_then(|(o, l)| text.get(o as usize..(o + l) as usize))
        .unwrap_or("");
    let (kind, raw_text) = match raw.value {
        Raw::Null => (Kind::Null, String::new()),
        Raw::Bool(b) => (Kind::Bool(b), or_format(source, b)),
        Raw::I64(v) => (Kind::I64(v), or_format(source, v)),
        Raw::U64(v) => (Kind::U64(v), or_format(source, v)),
        Raw::F64(v) => (Kind::F64(v), or_format(source, v)),
        Raw::Str(s) => (Kind::Str(s), String::new()),
        Raw::Seq(items) => (
            Kind::Seq(
                items
                    .into_iter()
                    .map(|n| convert(n, text, next_id))
                    .collect(),
            ),
            String::new(),
        ),
        Raw::Map(entries) => {
            let entries = entries
                .into_iter()
                .map(|(k, v)| {
                    let k = convert(k, text, next_id);
                    (k, convert(v, text, next_id))
                })
                .collect();
            (Kind::Map(entries), String::new())
        }
    };
    Node {
        id,
        pos,
        kind,
        raw: raw_text,
    }
}

/// The scalar as written if the source slice looks like it, else the parsed value printed.
fn or_format(source: &str, value: impl fmt::Display) -> String {
    let s = source.trim();
    if s.is_empty() || s.starts_with('*') || s.contains('\n') {
        value.to_string()
    } else {
        s.to_string()
    }
}

/// The elements of a list node that made it into the typed value (poisoned ones were dropped), so
/// `kept(..)[i]` is the node of the typed list's element `i`.
pub(crate) fn kept<'a>(
    list: Option<&'a Node>,
    poisoned: &std::collections::HashSet<usize>,
) -> Vec<&'a Node> {
    list.map_or(&[][..], Node::items)
        .iter()
        .filter(|n| !poisoned.contains(&n.id))
        .collect()
}

/// Pairs typed list elements with their nodes; `fallback` (the parent) if the tree has fewer.
pub(crate) fn pair<'a, T>(
    items: impl IntoIterator<Item = T>,
    nodes: Vec<&'a Node>,
    fallback: &'a Node,
) -> impl Iterator<Item = (T, &'a Node)> {
    items
        .into_iter()
        .zip(nodes.into_iter().chain(std::iter::repeat(fallback)))
}
