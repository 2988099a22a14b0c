//! Parameters accepted and ignored: a client sends `temperature`, `seed` or a field of its
//! own, and the site samples as it likes. Each is logged once per process (at info level),
//! naming the front door and the field, so an operator learns what clients send without a
//! line per request.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// Fields already logged, as `door field`.
fn logged() -> &'static Mutex<HashSet<String>> {
    static LOGGED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    LOGGED.get_or_init(Default::default)
}

/// Logs `field` of `door`'s requests as accepted and ignored, the first time only. Returns
/// whether it logged.
pub fn note(door: &str, field: &str) -> bool {
    let key = format!("{door} {field}");
    let first = logged()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key);
    if first {
        tracing::info!(
            door,
            parameter = field,
            "parameter `{field}` is accepted and ignored (the site samples as it likes); logged once"
        );
    }
    first
}

/// Logs each of `fields` that the request set.
pub fn note_set(door: &str, fields: &[(&str, bool)]) {
    for (field, set) in fields {
        if *set {
            note(door, field);
        }
    }
}

/// A field path as people write it: `messages[].name`, `metadata`.
pub fn path_name(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, .. } => format!("{}[]", path_name(parent)),
        Path::Map { parent, key } => {
            let parent = path_name(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_name(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_field_is_logged_once_per_door() {
        assert!(note("test-door", "temperature"));
        assert!(!note("test-door", "temperature"));
        assert!(note("other-door", "temperature"));
    }

    #[test]
    fn unknown_fields_are_named_by_their_path() {
        #[derive(serde::Deserialize)]
        struct Message {
            #[allow(dead_code)]
            role: String,
        }
        #[derive(serde::Deserialize)]
        struct Request {
            #[allow(dead_code)]
            messages: Vec<Message>,
        }
        let mut seen = Vec::new();
        let json = r#"{"messages":[{"role":"user","name":"x"}],"seed":1}"#;
        let mut de = serde_json::Deserializer::from_str(json);
        let _: Request =
            serde_ignored::deserialize(&mut de, |path| seen.push(path_name(&path))).unwrap();
        assert_eq!(seen, ["messages[].name", "seed"]);
    }
}
