//! JSON pointers as the flow writes them: with or without the leading `/`, `""` for the whole
//! value, and `-1` for the last element of a list.

use std::borrow::Cow;

use serde_json::Value;

/// A pointer split into unescaped tokens once, so that lookups per event do no parsing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Pointer {
    tokens: Vec<String>,
}

impl Pointer {
    pub(super) fn parse(path: &str) -> Self {
        Self {
            tokens: tokens(path).map(Cow::into_owned).collect(),
        }
    }

    pub(super) fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// The value this pointer names inside `value`.
    pub(super) fn get<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        walk(value, &self.tokens)
    }

    /// The position of the last `-1` token (a "last element of the list" step).
    pub(super) fn last_list_step(&self) -> Option<usize> {
        self.tokens.iter().rposition(|t| t == "-1")
    }
}

/// The unescaped tokens of `path` (`~1` → `/`, `~0` → `~`); a leading `/` is optional, so
/// `""` and `"/"` both name the whole value.
pub(super) fn tokens(path: &str) -> impl Iterator<Item = Cow<'_, str>> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let mut parts = path.split('/');
    if path.is_empty() {
        // `"".split('/')` yields one empty token; the empty path has none.
        parts.next();
    }
    parts.map(unescape)
}

/// `path` without its leading `/`, the form patch paths are compared in.
pub(super) fn normalize(path: &str) -> &str {
    path.strip_prefix('/').unwrap_or(path)
}

fn unescape(token: &str) -> Cow<'_, str> {
    if token.contains('~') {
        Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        Cow::Borrowed(token)
    }
}

/// Follows `tokens` down from `value`.
pub(super) fn walk<'v, T: AsRef<str>>(value: &'v Value, tokens: &[T]) -> Option<&'v Value> {
    tokens
        .iter()
        .try_fold(value, |current, token| step(current, token.as_ref()))
}

/// One step down: an object key, or a list index (`-1` = the last element).
pub(super) fn step<'v>(value: &'v Value, token: &str) -> Option<&'v Value> {
    match value {
        Value::Object(map) => map.get(token),
        Value::Array(list) => index(list.len(), token).map(|i| &list[i]),
        _ => None,
    }
}

/// The list index `token` names in a list of `len` elements, if it is inside.
pub(super) fn index(len: usize, token: &str) -> Option<usize> {
    if token == "-1" {
        return len.checked_sub(1);
    }
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    token.parse::<usize>().ok().filter(|&i| i < len)
}

/// The mutable value at `path` in `doc`, creating missing object members (and growing a list
/// by one at index `len` or `-`) when `create` is set.
pub(super) fn get_mut<'v>(doc: &'v mut Value, path: &str, create: bool) -> Option<&'v mut Value> {
    let mut current = doc;
    for token in tokens(path) {
        if create && current.is_null() {
            *current = Value::Object(serde_json::Map::new());
        }
        current = match current {
            Value::Object(map) => {
                // Looked up first: `entry` would allocate the key on every call.
                if create && !map.contains_key(token.as_ref()) {
                    map.insert(token.clone().into_owned(), Value::Null);
                }
                map.get_mut(token.as_ref())?
            }
            Value::Array(list) => {
                let len = list.len();
                let at = match index(len, &token) {
                    Some(i) => i,
                    None if create && (token == "-" || token.parse::<usize>() == Ok(len)) => {
                        list.push(Value::Null);
                        len
                    }
                    None => return None,
                };
                &mut list[at]
            }
            _ => return None,
        };
    }
    Some(current)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn pointers_accept_both_spellings_and_last_element() {
        let v = json!({"a": {"b/c": [1, 2, {"x": "y"}]}, "": 5});
        assert_eq!(Pointer::parse("/a/b~1c/-1/x").get(&v), Some(&json!("y")));
        assert_eq!(Pointer::parse("a/b~1c/0").get(&v), Some(&json!(1)));
        assert_eq!(Pointer::parse("").get(&v), Some(&v));
        // The leading `/` is optional, so `/` is the whole value too (not the key "").
        assert_eq!(Pointer::parse("/").get(&v), Some(&v));
        assert_eq!(Pointer::parse("/a/b~1c/3").get(&v), None);
        assert_eq!(Pointer::parse("/a/b~1c/+1").get(&v), None);
    }

    #[test]
    fn get_mut_creates_members_and_appends_to_lists() {
        let mut v = json!(null);
        *get_mut(&mut v, "/a/b", true).unwrap() = json!([]);
        *get_mut(&mut v, "a/b/0", true).unwrap() = json!("x");
        *get_mut(&mut v, "a/b/-", true).unwrap() = json!("y");
        assert_eq!(v, json!({"a": {"b": ["x", "y"]}}));
        assert!(get_mut(&mut v, "a/c", false).is_none());
    }
}
