//! Parsing only the parts of an event the engine reads.
//!
//! A typical chat event carries ids, model names, timestamps and usage around one short piece
//! of text. Building a whole `serde_json::Value` for it allocates every key and string; the
//! selection walks the same bytes (so invalid JSON is still refused) but keeps only the
//! subtrees its pointers name, and gives back a `Value` those pointers resolve in exactly as
//! in the whole event.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::pointer::Pointer;

/// What to keep of each event: everything, or the subtrees under a set of pointers.
#[derive(Debug, Clone)]
pub(super) enum Selection {
    Everything,
    Paths(Node),
}

/// One step of the selected pointers. A node with `whole` set keeps its value entire.
#[derive(Debug, Clone, Default)]
pub(super) struct Node {
    whole: bool,
    /// Object key or list index (`-1` = the last element) → what to keep below it.
    children: Vec<(String, Node)>,
}

impl Selection {
    /// Keeps what `pointers` name; an empty pointer (the whole event) keeps everything.
    pub(super) fn of<'p>(pointers: impl IntoIterator<Item = &'p Pointer>) -> Self {
        let mut root = Node::default();
        for pointer in pointers {
            root.insert(pointer.tokens());
        }
        if root.whole {
            return Selection::Everything;
        }
        root.finish();
        Selection::Paths(root)
    }

    pub(super) fn parse(&self, data: &str) -> Result<Value, serde_json::Error> {
        match self {
            Selection::Everything => serde_json::from_str(data),
            Selection::Paths(root) => {
                let mut de = serde_json::Deserializer::from_str(data);
                let value = Keep(root).deserialize(&mut de)?;
                de.end()?;
                Ok(value)
            }
        }
    }
}

impl Node {
    fn insert(&mut self, tokens: &[String]) {
        let Some((token, rest)) = tokens.split_first() else {
            self.whole = true;
            return;
        };
        let at = match self.children.iter().position(|(k, _)| k == token) {
            Some(at) => at,
            None => {
                self.children.push((token.clone(), Node::default()));
                self.children.len() - 1
            }
        };
        self.children[at].1.insert(rest);
    }

    fn merge(&mut self, other: &Node) {
        self.whole |= other.whole;
        for (token, node) in &other.children {
            match self.children.iter_mut().find(|(k, _)| k == token) {
                Some((_, mine)) => mine.merge(node),
                None => self.children.push((token.clone(), node.clone())),
            }
        }
    }

    /// An element named by its index may also be the last one: it keeps what `-1` keeps too.
    fn finish(&mut self) {
        if self.whole {
            self.children.clear();
            return;
        }
        if let Some(last) = self
            .children
            .iter()
            .find(|(k, _)| k == "-1")
            .map(|(_, n)| n.clone())
        {
            for (token, node) in &mut self.children {
                if token.parse::<usize>().is_ok() {
                    node.merge(&last);
                }
            }
        }
        for (_, node) in &mut self.children {
            node.finish();
        }
    }

    fn key(&self, key: &str) -> Option<(&str, &Node)> {
        self.children
            .iter()
            .find(|(k, _)| k == key)
            .map(|(k, n)| (k.as_str(), n))
    }

    fn element(&self, index: usize) -> Option<&Node> {
        let mut last = None;
        for (token, node) in &self.children {
            if token == "-1" {
                last = Some(node);
            } else if token.parse::<usize>() == Ok(index) {
                return Some(node);
            }
        }
        last
    }
}

/// Deserializes the value at a node: whole, or only its selected children.
struct Keep<'n>(&'n Node);

impl<'de> DeserializeSeed<'de> for Keep<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        if self.0.whole {
            serde::Deserialize::deserialize(deserializer)
        } else {
            deserializer.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Keep<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut list = Vec::new();
        loop {
            // Skipped elements stay as `Null` so that indexes (and `-1`) still line up.
            let next = match self.0.element(list.len()) {
                Some(node) => seq.next_element_seed(Keep(node))?,
                None => seq.next_element::<IgnoredAny>()?.map(|_| Value::Null),
            };
            match next {
                Some(value) => list.push(value),
                None => return Ok(Value::Array(list)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut kept = Map::new();
        while let Some(found) = map.next_key_seed(Key(self.0))? {
            match found {
                Some((key, node)) => {
                    let value = map.next_value_seed(Keep(node))?;
                    kept.insert(key.to_owned(), value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(kept))
    }
}

/// Reads an object key and looks it up among the node's children without allocating.
struct Key<'n>(&'n Node);

impl<'de, 'n> DeserializeSeed<'de> for Key<'n> {
    type Value = Option<(&'n str, &'n Node)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, 'n> Visitor<'de> for Key<'n> {
    type Value = Option<(&'n str, &'n Node)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.key(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(paths: &[&str]) -> Selection {
        let pointers: Vec<Pointer> = paths.iter().map(|p| Pointer::parse(p)).collect();
        Selection::of(&pointers)
    }

    const EVENT: &str = r#"{"id":"c1","model":"m","created":1,"choices":[{"index":0,"delta":{"content":"Hi \"you\"","role":"assistant"},"finish_reason":null},{"delta":{"content":"last"}}],"usage":{"total":3},"meta":{"k":[1,{"x":2}]}}"#;

    #[test]
    fn selected_pointers_resolve_as_in_the_whole_event() {
        let paths = [
            "/choices/0/delta/content",
            "/choices/-1/delta/content",
            "/choices/0/finish_reason",
            "/usage",
            "/meta/k/1/x",
            "/missing/deep",
            "id",
        ];
        let whole: Value = serde_json::from_str(EVENT).unwrap();
        let kept = select(&paths).parse(EVENT).unwrap();
        for path in paths {
            let pointer = Pointer::parse(path);
            assert_eq!(pointer.get(&kept), pointer.get(&whole), "{path}");
        }
        // What nobody asked for is not built.
        assert!(kept.get("model").is_none());
        assert!(kept["choices"][0]["delta"].get("role").is_none());
    }

    #[test]
    fn the_empty_pointer_keeps_everything() {
        assert!(matches!(select(&["", "/a"]), Selection::Everything));
        let whole: Value = serde_json::from_str(EVENT).unwrap();
        assert_eq!(select(&[""]).parse(EVENT).unwrap(), whole);
    }

    #[test]
    fn invalid_json_is_refused_even_where_nothing_is_selected() {
        for bad in [r#"{"a":1,"b":[1,}"#, r#"{"a":1} trailing"#, r#"{"a":"#] {
            assert!(select(&["/a"]).parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scalars_and_lists_at_the_top_parse() {
        assert_eq!(
            select(&["/0"]).parse("[5,6]").unwrap(),
            serde_json::json!([5, null])
        );
        assert_eq!(
            select(&["/a"]).parse("\"text\"").unwrap(),
            Value::from("text")
        );
        assert_eq!(select(&["/a"]).parse("null").unwrap(), Value::Null);
    }
}
