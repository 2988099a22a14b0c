//! Append-patch accrual: `{"p": path, "o": op, "v": value}` operations applied to a minimal
//! JSON document of the patched state, so that `-1` means "the last element" and a reasoning
//! flag can look at the list element a piece of text belongs to.
//!
//! - `{"v": …}` alone continues the last path and op (the first one, with no path before it,
//!   sets the whole document); `{"p": …, "v": …}` without `o` continues the last op on the same
//!   path and sets otherwise.
//! - Ops, case-insensitive: `append`; `add`/`replace`/`set`; `patch`/`batch` (a list of ops whose
//!   paths are relative to `p`); a bare list of ops is a batch too, and so is `{"v": [ops]}`
//!   with neither `p` nor `o` (a list of operations is a batch, not a value continuing the
//!   last path). Other ops are ignored.
//! - Text comes from an append to the text path, from a set of it (emitting the suffix when the
//!   new value extends the old one, else the whole), from an append of elements to the list a
//!   `-1` step names (each element's text), and from a set of an ancestor (each list element's
//!   text when the rest of the path has a `-1` step, else the cumulative rule above).

use serde_json::{Map, Value};

use super::Delta;
use super::accrual::Output;
use super::pointer::{self, Pointer};

/// A patch path that carries text (or reasoning).
#[derive(Debug)]
pub(super) struct PatchTarget {
    pointer: Pointer,
    /// The path without its leading `/`, for the fast exact comparison.
    joined: String,
    event: Option<String>,
    reasoning: bool,
    list_step: Option<usize>,
}

impl PatchTarget {
    pub(super) fn new(pointer: Pointer, event: Option<String>, reasoning: bool) -> Self {
        let joined = pointer
            .tokens()
            .iter()
            .map(|t| t.replace('~', "~0").replace('/', "~1"))
            .collect::<Vec<_>>()
            .join("/");
        let list_step = pointer.last_list_step();
        Self {
            pointer,
            joined,
            event,
            reasoning,
            list_step,
        }
    }

    /// The list element the text at this target belongs to, when the op at `depth` sets
    /// `value` and the target has a `-1` step above that depth.
    fn element<'a>(&self, doc: &'a Value, depth: usize, value: &'a Value) -> Option<&'a Value> {
        let step = self.list_step?;
        if step >= depth {
            None
        } else if step + 1 == depth {
            Some(value)
        } else {
            pointer::walk(doc, &self.pointer.tokens()[..=step])
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Append,
    Set,
    Batch,
    Other,
}

impl Op {
    fn parse(op: &str) -> Self {
        let is = |name: &str| op.eq_ignore_ascii_case(name);
        if is("append") {
            Op::Append
        } else if is("add") || is("replace") || is("set") {
            Op::Set
        } else if is("patch") || is("batch") {
            Op::Batch
        } else {
            Op::Other
        }
    }
}

enum Relation {
    Unrelated,
    /// The op's path is the target's.
    Exact,
    /// The op's path is an ancestor of the target's, this many steps down.
    Ancestor(usize),
}

#[derive(Debug)]
pub(super) struct Patch {
    targets: Vec<PatchTarget>,
    doc: Value,
    last_path: String,
    last_op: Op,
    has_last: bool,
}

impl Patch {
    pub(super) fn new(targets: Vec<PatchTarget>) -> Self {
        Self {
            targets,
            doc: Value::Null,
            last_path: String::new(),
            last_op: Op::Set,
            has_last: false,
        }
    }

    pub(super) fn has_targets(&self) -> bool {
        !self.targets.is_empty()
    }

    /// Applies one event's ops, emitting the text they add.
    pub(super) fn apply_event(
        &mut self,
        name: Option<&str>,
        value: Value,
        output: &mut Output,
        out: &mut Vec<Delta>,
    ) {
        let mut accepting = 0u32;
        for (i, target) in self.targets.iter().enumerate().take(32) {
            if target
                .event
                .as_deref()
                .is_none_or(|want| name == Some(want))
            {
                accepting |= 1 << i;
            }
        }
        if accepting == 0 {
            return;
        }
        match value {
            Value::Object(op) if op.contains_key("v") => {
                self.apply_op(op, "", accepting, output, out);
            }
            Value::Array(ops) => self.apply_batch(ops, "", accepting, output, out),
            _ => {}
        }
    }

    fn apply_batch(
        &mut self,
        ops: Vec<Value>,
        prefix: &str,
        accepting: u32,
        output: &mut Output,
        out: &mut Vec<Delta>,
    ) {
        for op in ops {
            if let Value::Object(op) = op {
                self.apply_op(op, prefix, accepting, output, out);
            }
        }
    }

    fn apply_op(
        &mut self,
        mut op: Map<String, Value>,
        prefix: &str,
        accepting: u32,
        output: &mut Output,
        out: &mut Vec<Delta>,
    ) {
        let Some(value) = op.remove("v") else {
            return;
        };
        let named = op.get("o").and_then(Value::as_str).map(Op::parse);
        let mut continued = false;
        let (path, kind) = match op.get("p").and_then(Value::as_str) {
            Some(p) => {
                let p = pointer::normalize(p);
                let path = match (prefix.is_empty(), p.is_empty()) {
                    (true, _) => p.to_owned(),
                    (false, true) => prefix.to_owned(),
                    (false, false) => format!("{prefix}/{p}"),
                };
                let kind = named.unwrap_or(if self.has_last && path == self.last_path {
                    self.last_op
                } else {
                    Op::Set
                });
                (path, kind)
            }
            None => match named {
                Some(Op::Batch) => (prefix.to_owned(), Op::Batch),
                None if is_op_list(&value) => (prefix.to_owned(), Op::Batch),
                _ if self.has_last => {
                    continued = true;
                    (
                        std::mem::take(&mut self.last_path),
                        named.unwrap_or(self.last_op),
                    )
                }
                _ => (prefix.to_owned(), named.unwrap_or(Op::Set)),
            },
        };
        if kind == Op::Batch {
            if let Value::Array(ops) = value {
                self.apply_batch(ops, &path, accepting, output, out);
            }
            if continued && self.last_path.is_empty() {
                // No inner op took the path over: keep it for the next continuation.
                self.last_path = path;
            }
            return;
        }
        for (i, target) in self.targets.iter().enumerate() {
            if accepting & (1 << i) != 0 {
                emit_for(&self.doc, target, &path, kind, &value, output, out);
            }
        }
        apply(&mut self.doc, &path, kind, value);
        self.last_path = path;
        self.last_op = kind;
        self.has_last = true;
    }
}

/// Whether `value` is a list of patch operations: objects with a `p` or an `o`, and nothing
/// but `p`, `o`, `v` and `c`. A text or a list of values never looks like that.
pub(crate) fn is_op_list(value: &Value) -> bool {
    let Value::Array(items) = value else {
        return false;
    };
    !items.is_empty()
        && items.iter().all(|item| {
            item.as_object().is_some_and(|op| {
                (op.contains_key("p") || op.contains_key("o"))
                    && op
                        .keys()
                        .all(|k| matches!(k.as_str(), "p" | "o" | "v" | "c"))
            })
        })
}

/// How the op path `path` stands to `target`, given the document before the op.
fn relate(doc: &Value, path: &str, target: &PatchTarget) -> Relation {
    if path == target.joined {
        return Relation::Exact;
    }
    let wanted = target.pointer.tokens();
    let mut current = Some(doc);
    let mut depth = 0;
    for token in pointer::tokens(path) {
        let Some(want) = wanted.get(depth) else {
            return Relation::Unrelated;
        };
        if token != want.as_str() && !same_last_element(current, &token, want) {
            return Relation::Unrelated;
        }
        current = current.and_then(|c| pointer::step(c, &token));
        depth += 1;
    }
    if depth == wanted.len() {
        Relation::Exact
    } else {
        Relation::Ancestor(depth)
    }
}

/// `-1` and the index of the last element name the same element of `list`.
fn same_last_element(list: Option<&Value>, a: &str, b: &str) -> bool {
    let Some(Value::Array(list)) = list else {
        return false;
    };
    let last = pointer::index(list.len(), "-1");
    last.is_some() && pointer::index(list.len(), a) == last && pointer::index(list.len(), b) == last
}

/// Emits the text `value` adds at `target` through an op of `kind` at `path`.
fn emit_for(
    doc: &Value,
    target: &PatchTarget,
    path: &str,
    kind: Op,
    value: &Value,
    output: &mut Output,
    out: &mut Vec<Delta>,
) {
    let wanted = target.pointer.tokens();
    match (relate(doc, path, target), kind) {
        (Relation::Unrelated, _) | (_, Op::Batch | Op::Other) => {}
        (Relation::Exact, Op::Append) => {
            if let Value::String(piece) = value {
                let element = target.element(doc, wanted.len(), value);
                output.emit(target.reasoning, element, piece, out);
            }
        }
        (Relation::Exact, Op::Set) => {
            if let Value::String(new) = value {
                let element = target.element(doc, wanted.len(), value);
                emit_replacement(doc, target, new, element, output, out);
            }
        }
        (Relation::Ancestor(depth), Op::Append) => {
            let rest = &wanted[depth..];
            if rest[0] != "-1" {
                return;
            }
            let appended: &[Value] = match value {
                Value::Array(items) => items,
                Value::Object(_) => std::slice::from_ref(value),
                _ => &[],
            };
            for element in appended {
                if let Some(Value::String(piece)) = pointer::walk(element, &rest[1..]) {
                    output.emit(target.reasoning, Some(element), piece, out);
                }
            }
        }
        (Relation::Ancestor(depth), Op::Set) => {
            let rest = &wanted[depth..];
            match rest.iter().position(|t| t == "-1") {
                Some(step) => {
                    let Some(Value::Array(items)) = pointer::walk(value, &rest[..step]) else {
                        return;
                    };
                    for element in items {
                        if let Some(Value::String(piece)) =
                            pointer::walk(element, &rest[step + 1..])
                        {
                            output.emit(target.reasoning, Some(element), piece, out);
                        }
                    }
                }
                None => {
                    if let Some(Value::String(new)) = pointer::walk(value, rest) {
                        let element = target.element(doc, depth, value);
                        emit_replacement(doc, target, new, element, output, out);
                    }
                }
            }
        }
    }
}

/// A new whole value for the target: the suffix when it extends the old value, else all of it.
fn emit_replacement(
    doc: &Value,
    target: &PatchTarget,
    new: &str,
    element: Option<&Value>,
    output: &mut Output,
    out: &mut Vec<Delta>,
) {
    let old = target
        .pointer
        .get(doc)
        .and_then(Value::as_str)
        .unwrap_or("");
    let piece = new.strip_prefix(old).unwrap_or(new);
    output.emit(target.reasoning, element, piece, out);
}

/// Applies one op to the document.
fn apply(doc: &mut Value, path: &str, kind: Op, value: Value) {
    match kind {
        Op::Append => {
            let Some(target) = pointer::get_mut(doc, path, true) else {
                return;
            };
            match (target, value) {
                (Value::String(text), Value::String(piece)) => text.push_str(&piece),
                (Value::Array(list), Value::Array(items)) => list.extend(items),
                (Value::Array(list), item) => list.push(item),
                (target @ Value::Null, value) => *target = value,
                _ => {}
            }
        }
        Op::Set => {
            if let Some(target) = pointer::get_mut(doc, path, true) {
                *target = value;
            }
        }
        Op::Batch | Op::Other => {}
    }
}
