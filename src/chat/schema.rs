//! Checks a JSON value against the subset of JSON Schema that tool parameters and structured
//! outputs use: `type` (one or a list), `properties`, `required`, `additionalProperties`,
//! `items`, `enum`, `const`, `anyOf` / `oneOf` / `allOf`, local `$ref` (`#/$defs/…`,
//! `#/definitions/…`), `nullable`, numeric bounds, string and array lengths, `pattern`.
//! Other keywords are ignored, so a schema never makes a valid value fail.
//!
//! Hand-written rather than the `jsonschema` crate: that subset is all clients send, and the
//! crate would add dozens of dependencies to a build that must stay lean.

use serde_json::Value;

/// Checks `value` against `schema`; the error names the first place that does not fit.
pub fn check(schema: &Value, value: &Value) -> Result<(), String> {
    let mut checker = Checker { root: schema };
    checker.check(schema, value, "$", 0)
}

struct Checker<'a> {
    root: &'a Value,
}

/// Deeper than this is a cycle of `$ref`s, not a real schema.
const MAX_DEPTH: usize = 64;

impl<'a> Checker<'a> {
    fn check(
        &mut self,
        schema: &'a Value,
        value: &Value,
        at: &str,
        depth: usize,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("the schema nests too deeply at `{at}`"));
        }
        let Value::Object(schema) = schema else {
            // `true` (or anything not an object) accepts everything; `false` nothing.
            return match schema {
                Value::Bool(false) => Err(format!("`{at}` is not allowed")),
                _ => Ok(()),
            };
        };
        if let Some(Value::String(reference)) = schema.get("$ref") {
            let target = reference
                .strip_prefix('#')
                .and_then(|pointer| self.root.pointer(pointer))
                .ok_or_else(|| format!("the schema's `$ref` `{reference}` is not found"))?;
            self.check(target, value, at, depth + 1)?;
        }
        if value.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
            return Ok(());
        }
        if let Some(types) = schema.get("type") {
            let allowed: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if !allowed.is_empty() && !allowed.iter().any(|t| is_type(value, t)) {
                return Err(format!(
                    "`{at}` must be {}, not {}",
                    allowed
                        .iter()
                        .map(|t| article(t))
                        .collect::<Vec<_>>()
                        .join(" or "),
                    article(type_name(value))
                ));
            }
        }
        if let Some(Value::Array(options)) = schema.get("enum")
            && !options.iter().any(|o| same(o, value))
        {
            let shown: Vec<String> = options.iter().map(Value::to_string).collect();
            return Err(format!("`{at}` must be one of {}", shown.join(", ")));
        }
        if let Some(expected) = schema.get("const")
            && !same(expected, value)
        {
            return Err(format!("`{at}` must be {expected}"));
        }
        if let Some(Value::Array(all)) = schema.get("allOf") {
            for sub in all {
                self.check(sub, value, at, depth + 1)?;
            }
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(Value::Array(options)) = schema.get(key) {
                let mut first_error = None;
                let mut fits = 0;
                for sub in options {
                    match self.check(sub, value, at, depth + 1) {
                        Ok(()) => fits += 1,
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                if fits == 0 {
                    return Err(first_error
                        .unwrap_or_else(|| format!("`{at}` fits none of the allowed shapes")));
                }
                if key == "oneOf" && fits > 1 {
                    return Err(format!("`{at}` fits more than one of the allowed shapes"));
                }
            }
        }
        match value {
            Value::Object(map) => self.check_object(schema, map, at, depth),
            Value::Array(items) => self.check_array(schema, items, at, depth),
            Value::String(s) => check_string(schema, s, at),
            Value::Number(n) => check_number(schema, n.as_f64().unwrap_or(0.0), at),
            _ => Ok(()),
        }
    }

    fn check_object(
        &mut self,
        schema: &'a serde_json::Map<String, Value>,
        map: &serde_json::Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<(), String> {
        if let Some(Value::Array(required)) = schema.get("required") {
            for name in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(name) {
                    return Err(format!("`{at}.{name}` is required"));
                }
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (name, item) in map {
            let place = format!("{at}.{name}");
            match properties.and_then(|p| p.get(name)) {
                Some(sub) => self.check(sub, item, &place, depth + 1)?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        let known: Vec<&str> = properties
                            .map(|p| p.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        return Err(format!(
                            "`{place}` is not an allowed property (allowed: {})",
                            known.join(", ")
                        ));
                    }
                    Some(sub @ Value::Object(_)) => self.check(sub, item, &place, depth + 1)?,
                    _ => {}
                },
            }
        }
        Ok(())
    }

    fn check_array(
        &mut self,
        schema: &'a serde_json::Map<String, Value>,
        items: &[Value],
        at: &str,
        depth: usize,
    ) -> Result<(), String> {
        let count = items.len() as f64;
        if let Some(min) = schema.get("minItems").and_then(Value::as_f64)
            && count < min
        {
            return Err(format!("`{at}` must have at least {min} items"));
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_f64)
            && count > max
        {
            return Err(format!("`{at}` must have at most {max} items"));
        }
        if let Some(sub) = schema.get("items").filter(|s| s.is_object()) {
            for (i, item) in items.iter().enumerate() {
                self.check(sub, item, &format!("{at}[{i}]"), depth + 1)?;
            }
        }
        Ok(())
    }
}

fn check_string(schema: &serde_json::Map<String, Value>, s: &str, at: &str) -> Result<(), String> {
    let length = s.chars().count() as f64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_f64)
        && length < min
    {
        return Err(format!("`{at}` must be at least {min} characters long"));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_f64)
        && length > max
    {
        return Err(format!("`{at}` must be at most {max} characters long"));
    }
    if let Some(Value::String(pattern)) = schema.get("pattern")
        // A pattern this regex engine cannot compile is not held against the value.
        && let Ok(re) = regex::Regex::new(pattern)
        && !re.is_match(s)
    {
        return Err(format!("`{at}` must match the pattern `{pattern}`"));
    }
    Ok(())
}

fn check_number(schema: &serde_json::Map<String, Value>, n: f64, at: &str) -> Result<(), String> {
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    if let Some(min) = bound("minimum")
        && n < min
    {
        return Err(format!("`{at}` must be at least {min}"));
    }
    if let Some(max) = bound("maximum")
        && n > max
    {
        return Err(format!("`{at}` must be at most {max}"));
    }
    if let Some(min) = bound("exclusiveMinimum")
        && n <= min
    {
        return Err(format!("`{at}` must be more than {min}"));
    }
    if let Some(max) = bound("exclusiveMaximum")
        && n >= max
    {
        return Err(format!("`{at}` must be less than {max}"));
    }
    Ok(())
}

fn is_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value
            .as_f64()
            .is_some_and(|n| n.fract() == 0.0 && n.is_finite()),
        // An unknown type name is not held against the value.
        _ => true,
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn article(name: &str) -> String {
    match name {
        "null" => "null".to_owned(),
        "integer" | "object" | "array" => format!("an {name}"),
        other => format!("a {other}"),
    }
}

/// JSON equality where `1` and `1.0` are the same number.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn weather() -> Value {
        json!({
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}
            },
            "required": ["city"],
            "additionalProperties": false
        })
    }

    #[test]
    fn accepts_what_fits_and_names_what_does_not() {
        let schema = weather();
        assert!(check(&schema, &json!({"city": "Paris", "unit": "c", "days": 3})).is_ok());
        assert!(check(&schema, &json!({"city": "Paris", "days": 3.0})).is_ok());
        let cases = [
            (json!({}), "`$.city` is required"),
            (
                json!({"city": 3}),
                "`$.city` must be a string, not an integer",
            ),
            (json!({"city": "P", "unit": "k"}), "`$.unit` must be one of"),
            (
                json!({"city": "P", "days": 9}),
                "`$.days` must be at most 7",
            ),
            (
                json!({"city": "P", "days": 1.5}),
                "`$.days` must be an integer",
            ),
            (
                json!({"city": "P", "town": "x"}),
                "`$.town` is not an allowed",
            ),
            (json!({"city": ""}), "at least 1 characters"),
            (json!([1]), "`$` must be an object, not an array"),
        ];
        for (value, expected) in cases {
            let err = check(&schema, &value).unwrap_err();
            assert!(err.contains(expected), "{value}: {err}");
        }
    }

    /// The shape pydantic writes: `$defs`, `$ref`, and `anyOf` with null for optionals.
    #[test]
    fn refs_any_of_and_arrays() {
        let schema = json!({
            "$defs": {"Person": {"type": "object", "properties": {"name": {"type": "string"},
                "age": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}, "required": ["name"]}},
            "type": "object",
            "properties": {"people": {"type": "array", "items": {"$ref": "#/$defs/Person"}, "minItems": 1}},
            "required": ["people"]
        });
        assert!(check(&schema, &json!({"people": [{"name": "Ada", "age": null}]})).is_ok());
        assert!(check(&schema, &json!({"people": [{"name": "Ada", "age": 36}]})).is_ok());
        let err = check(&schema, &json!({"people": [{"name": "Ada", "age": "x"}]})).unwrap_err();
        assert!(err.contains("`$.people[0].age`"), "{err}");
        let err = check(&schema, &json!({"people": []})).unwrap_err();
        assert!(err.contains("at least 1 items"), "{err}");
        let err = check(&json!({"$ref": "#/nope"}), &json!(1)).unwrap_err();
        assert!(err.contains("not found"), "{err}");
    }

    #[test]
    fn a_ref_cycle_is_an_error_not_a_stack_overflow() {
        let schema = json!({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"});
        assert!(check(&schema, &json!(1)).unwrap_err().contains("deeply"));
    }

    #[test]
    fn type_lists_nullable_and_unknown_keywords() {
        assert!(check(&json!({"type": ["string", "null"]}), &Value::Null).is_ok());
        assert!(check(&json!({"type": "string", "nullable": true}), &Value::Null).is_ok());
        assert!(
            check(
                &json!({"type": "string", "format": "date-time", "x-y": 1}),
                &json!("z")
            )
            .is_ok()
        );
        assert!(check(&json!({"pattern": "^[a-z]+$"}), &json!("abc")).is_ok());
        assert!(check(&json!({"pattern": "^[a-z]+$"}), &json!("aB")).is_err());
        assert!(
            check(
                &json!({"oneOf": [{"type": "number"}, {"type": "integer"}]}),
                &json!(1)
            )
            .is_err()
        );
    }
}
