//! Typed deserialization from the position tree, reporting *every* type error.
//!
//! serde stops at the first error, so [`from_tree`] retries: each failure names the node it happened at,
//! that node is "poisoned" (skipped as if absent: a mapping entry falls back to its default, a list
//! element is dropped) and deserialization runs again, until it succeeds. A required field that was
//! skipped poisons its parent instead of reporting a second, confusing "missing field".

use std::{collections::HashSet, fmt};

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, VariantAccess, Visitor,
};

use crate::tree::{Doc, Kind, Node};

/// A deserialization error and the node it happened at.
#[derive(Debug)]
pub(crate) struct Error {
    msg: String,
    node: Option<usize>,
    missing: Option<&'static str>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self {
            msg: msg.to_string(),
            node: None,
            missing: None,
        }
    }
    fn missing_field(field: &'static str) -> Self {
        Self {
            msg: format!("missing required key `{field}`"),
            node: None,
            missing: Some(field),
        }
    }
}

/// Attaches `node` to an error that has no node yet (the innermost node wins).
fn at(node: &Node) -> impl FnOnce(Error) -> Error + '_ {
    move |mut e| {
        e.node.get_or_insert(node.id);
        e
    }
}

/// The result of [`from_tree`]: the value (with poisoned parts left out) and every error found.
pub(crate) struct Typed<T> {
    pub value: Option<T>,
    /// (node id, message)
    pub errors: Vec<(usize, String)>,
    /// Nodes that were skipped; list elements among them are absent from `value`.
    pub poisoned: HashSet<usize>,
}

pub(crate) fn from_tree<T: DeserializeOwned>(doc: &Doc) -> Typed<T> {
    let mut poisoned = HashSet::new();
    let mut errors = Vec::new();
    loop {
        let err = match T::deserialize(NodeDe {
            node: &doc.root,
            poisoned: &poisoned,
        }) {
            Ok(value) => {
                return Typed {
                    value: Some(value),
                    errors,
                    poisoned,
                };
            }
            Err(e) => e,
        };
        let mut id = err.node.unwrap_or(doc.root.id);
        let caused_by_poison = err
            .missing
            .is_some_and(|field| entry_poisoned(doc, id, field, &poisoned));
        if !caused_by_poison && !poisoned.contains(&id) {
            errors.push((id, err.msg));
        }
        // A node that fails although already skipped (e.g. an enum's only entry) takes its parent with it.
        while poisoned.contains(&id) && id != doc.root.id {
            id = doc.parent(id);
        }
        // Each round poisons one more node, so this ends; the root cannot be skipped.
        if id == doc.root.id {
            return Typed {
                value: None,
                errors,
                poisoned,
            };
        }
        poisoned.insert(id);
    }
}

/// Whether the mapping `map_id` has a `field` entry that was skipped.
fn entry_poisoned(doc: &Doc, map_id: usize, field: &str, poisoned: &HashSet<usize>) -> bool {
    doc.node(map_id).is_some_and(|m| {
        m.entries().iter().any(|(k, v)| {
            k.text() == Some(field) && (poisoned.contains(&k.id) || poisoned.contains(&v.id))
        })
    })
}

/// A serde `Deserializer` reading one node.
#[derive(Clone, Copy)]
struct NodeDe<'a> {
    node: &'a Node,
    poisoned: &'a HashSet<usize>,
}

impl<'a> NodeDe<'a> {
    fn child(&self, node: &'a Node) -> Self {
        Self {
            node,
            poisoned: self.poisoned,
        }
    }

    fn unexpected(&self) -> Unexpected<'_> {
        match &self.node.kind {
            Kind::Null => Unexpected::Other("null"),
            Kind::Bool(b) => Unexpected::Bool(*b),
            Kind::I64(v) => Unexpected::Signed(*v),
            Kind::U64(v) => Unexpected::Unsigned(*v),
            Kind::F64(v) => Unexpected::Float(*v),
            Kind::Str(s) => Unexpected::Str(s),
            Kind::Seq(_) => Unexpected::Seq,
            Kind::Map(_) => Unexpected::Map,
        }
    }

    fn invalid<V: Visitor<'a>, T>(&self, visitor: &V) -> Result<T, Error> {
        Err(de::Error::invalid_type(self.unexpected(), visitor))
    }

    fn seq(&self) -> SeqDe<'a> {
        let items = self
            .node
            .items()
            .iter()
            .filter(|n| !self.poisoned.contains(&n.id))
            .collect::<Vec<_>>();
        SeqDe {
            items: items.into_iter(),
            de: *self,
        }
    }

    fn map(&self) -> MapDe<'a> {
        let entries = self
            .node
            .entries()
            .iter()
            .filter(|(k, v)| !self.poisoned.contains(&k.id) && !self.poisoned.contains(&v.id))
            .collect::<Vec<_>>();
        MapDe {
            entries: entries.into_iter(),
            value: None,
            de: *self,
        }
    }
}

impl<'de> de::Deserializer<'de> for NodeDe<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.node.kind {
            Kind::Null => visitor.visit_unit(),
            Kind::Bool(b) => visitor.visit_bool(*b),
            Kind::I64(v) => visitor.visit_i64(*v),
            Kind::U64(v) => visitor.visit_u64(*v),
            Kind::F64(v) => visitor.visit_f64(*v),
            Kind::Str(s) => visitor.visit_str(s),
            Kind::Seq(_) => visitor.visit_seq(self.seq()),
            Kind::Map(_) => visitor.visit_map(self.map()),
        }
        .map_err(at(self.node))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.node.kind {
            Kind::Bool(b) => visitor.visit_bool(b),
            _ => self.invalid(&visitor),
        }
        .map_err(at(self.node))
    }

    /// Strings accept any scalar as written (`port`-like `0012` stays `0012`), but not null or collections.
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.node.text() {
            Some(s) => visitor.visit_str(s),
            None => self.invalid(&visitor),
        }
        .map_err(at(self.node))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.node.kind {
            Kind::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
        .map_err(at(self.node))
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.node.kind {
            Kind::Null => visitor.visit_unit(),
            _ => self.invalid(&visitor),
        }
        .map_err(at(self.node))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self).map_err(at(self.node))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.node.kind {
            Kind::Seq(_) => visitor.visit_seq(self.seq()),
            _ => self.invalid(&visitor),
        }
        .map_err(at(self.node))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.node.kind {
            Kind::Map(_) => visitor.visit_map(self.map()),
            _ => self.invalid(&visitor),
        }
        .map_err(at(self.node))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }

    /// `variant` or `{ variant: value }` (serde's external tagging).
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match &self.node.kind {
            Kind::Str(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            Kind::Map(entries) if entries.len() == 1 => {
                let (key, value) = &entries[0];
                visitor.visit_enum(EnumDe {
                    key: self.child(key),
                    value: self.child(value),
                })
            }
            _ => self.invalid(&visitor),
        }
        .map_err(at(self.node))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf
    }
}

struct SeqDe<'a> {
    items: std::vec::IntoIter<&'a Node>,
    de: NodeDe<'a>,
}

impl<'de> SeqAccess<'de> for SeqDe<'de> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.items.next() {
            Some(node) => seed
                .deserialize(self.de.child(node))
                .map(Some)
                .map_err(at(node)),
            None => Ok(None),
        }
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapDe<'a> {
    entries: std::vec::IntoIter<&'a (Node, Node)>,
    value: Option<&'a Node>,
    de: NodeDe<'a>,
}

impl<'de> MapAccess<'de> for MapDe<'de> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(value);
        seed.deserialize(self.de.child(key))
            .map(Some)
            .map_err(at(key))
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let value = self
            .value
            .take()
            .expect("serde asks for a value after its key");
        seed.deserialize(self.de.child(value)).map_err(at(value))
    }
}

struct EnumDe<'a> {
    key: NodeDe<'a>,
    value: NodeDe<'a>,
}

impl<'de> EnumAccess<'de> for EnumDe<'de> {
    type Error = Error;
    type Variant = NodeDe<'de>;
    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, NodeDe<'de>), Error> {
        let variant = seed.deserialize(self.key).map_err(at(self.key.node))?;
        Ok((variant, self.value))
    }
}

impl<'de> VariantAccess<'de> for NodeDe<'de> {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        de::Deserialize::deserialize(self)
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(self, visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_map(self, visitor)
    }
}
