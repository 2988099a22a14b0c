//! Comparing the text a page rendered with the text on the wire. The page shows rendered
//! markdown (`innerText`), the wire carries markdown source, and whitespace differs between
//! the two (paragraphs, list items, `<br>`), so both sides are reduced to their visible
//! characters: markdown markup and every whitespace character are dropped.

/// The comparable form of `text`.
pub(crate) fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = line.trim();
        // Code fences (and their language tag) and horizontal rules / table separators are
        // not shown as text.
        if line.starts_with("```") || line.starts_with("~~~") || is_rule(line) {
            continue;
        }
        let line = strip_block_markers(line);
        let line = strip_links(line);
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek().is_some_and(|n| n.is_ascii_punctuation()) => {
                    if let Some(next) = chars.next()
                        && !is_markup(next)
                    {
                        out.push(next);
                    }
                }
                c if is_markup(c) || c.is_whitespace() => {}
                c => out.push(c),
            }
        }
    }
    out
}

/// Characters that are markdown markup (emphasis, code, strikethrough, tables).
fn is_markup(c: char) -> bool {
    matches!(c, '*' | '_' | '`' | '~' | '|')
}

/// `---`, `***`, `___`, `|---|:--|`: lines that render as no text.
fn is_rule(line: &str) -> bool {
    line.len() >= 3
        && line.chars().any(|c| matches!(c, '-' | '*' | '_'))
        && line
            .chars()
            .all(|c| matches!(c, '-' | '*' | '_' | '|' | ':' | '=') || c.is_whitespace())
}

/// Drops a leading heading, quote or list marker (`# `, `> `, `- `, `* `, `+ `, `1. `, `1) `).
fn strip_block_markers(mut line: &str) -> &str {
    loop {
        let before = line;
        if let Some(rest) = line.strip_prefix('>') {
            line = rest.trim_start();
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(char::is_whitespace) {
            line = line[hashes..].trim_start();
        }
        for marker in ["- ", "* ", "+ ", "• "] {
            if let Some(rest) = line.strip_prefix(marker) {
                line = rest.trim_start();
            }
        }
        let digits = line.chars().take_while(char::is_ascii_digit).count();
        if (1..=3).contains(&digits) {
            let rest = &line[digits..];
            if let Some(rest) = rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") ")) {
                line = rest.trim_start();
            }
        }
        // Task list boxes.
        for marker in ["[ ] ", "[x] ", "[X] "] {
            if let Some(rest) = line.strip_prefix(marker) {
                line = rest;
            }
        }
        if line == before {
            return line;
        }
    }
}

/// `[text](url)` and `![alt](url)` → the text the page shows.
fn strip_links(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(open) = rest.find('[') {
        let (before, after) = rest.split_at(open);
        let Some(close) = after.find("](") else {
            break;
        };
        let Some(end) = after[close + 2..].find(')') else {
            break;
        };
        out.push_str(before.strip_suffix('!').unwrap_or(before));
        out.push_str(&after[1..close]);
        rest = &after[close + 2 + end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_source_and_rendered_text_compare_equal() {
        let wire = "You said: hi\n\nHere:\n\n- It is **2 characters** long.\n- In the `x` format.\n\n1. one\n## Title\n> quoted [link](http://x) ![img](y)\n```rust\nlet a = 1;\n```\n---\n| a | b |\n|---|---|\n";
        let dom = "You said: hi\nHere:\nIt is 2 characters long.\nIn the x format.\none\nTitle\nquoted link img\nlet a = 1;\na\tb\n";
        assert_eq!(normalize(wire), normalize(dom));
        assert_ne!(normalize("a b"), normalize("a c"));
        assert_eq!(normalize(r"1 \* 2"), "12");
    }
}
