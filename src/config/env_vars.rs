//! `${NAME}` in config strings: the environment variable NAME, so that credentials live in the
//! environment (or a secrets manager that fills it) and never in the file. `$${` is a literal
//! `${`. Every string value of the file is expanded, keys are not; an unset or malformed
//! reference is an error located at the reference itself.

use std::ops::Range;

use toml_edit::{ImDocument, Item, TableLike};

/// A reference that cannot be expanded: where it starts in the string (in bytes), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unexpandable {
    pub at: usize,
    pub message: String,
}

/// Expands every `${NAME}` in `text` with `lookup(NAME)`; `$${` gives `${`.
pub fn expand(
    text: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, Unexpandable> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find('$') {
        let at = text.len() - rest.len() + found;
        out.push_str(&rest[..found]);
        let tail = &rest[found..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err(Unexpandable {
                    at,
                    message: "`${` without a closing `}` (write `$${` for a literal `${`)".into(),
                });
            };
            let name = &after[..end];
            if !is_name(name) {
                return Err(Unexpandable {
                    at,
                    message: format!(
                        "`${{{name}}}` is not a variable name (letters, digits and `_`, not \
                         starting with a digit; write `$${{` for a literal `${{`)"
                    ),
                });
            }
            let value = lookup(name).ok_or_else(|| Unexpandable {
                at,
                message: format!("environment variable `{name}` is not set"),
            })?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Expands every string value of `values` in place from the process environment. Problems come
/// back as (byte offset in `source`, message), `document` being the same file parsed with
/// positions.
pub fn expand_table(
    values: &mut toml::Table,
    document: &ImDocument<&str>,
    source: &str,
) -> Vec<(usize, String)> {
    let lookup = |name: &str| std::env::var(name).ok();
    let mut problems = Vec::new();
    let root = Node::Table(document.as_table());
    for (key, value) in values.iter_mut() {
        let node = root.key(key);
        walk(value, node, source, &lookup, &mut problems);
    }
    problems
}

fn walk(
    value: &mut toml::Value,
    node: Option<Node>,
    source: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<(usize, String)>,
) {
    match value {
        toml::Value::String(text) => {
            if !text.contains('$') {
                return;
            }
            match expand(text, lookup) {
                Ok(expanded) => *text = expanded,
                Err(problem) => {
                    let span = node.and_then(Node::span).unwrap_or(0..0);
                    problems.push((locate(source, span, text, &problem), problem.message));
                }
            }
        }
        toml::Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                let child = node.and_then(|n| n.index(index));
                walk(item, child, source, lookup, problems);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let child = node.and_then(|n| n.key(key));
                walk(item, child, source, lookup, problems);
            }
        }
        _ => {}
    }
}

/// The offset of the faulty reference in the file: found in the value's raw text when it is
/// written there as is (no escapes before it), else the value's start.
fn locate(source: &str, span: Range<usize>, text: &str, problem: &Unexpandable) -> usize {
    let raw = source.get(span.clone()).unwrap_or_default();
    let reference = &text[problem.at..];
    let reference = reference
        .find('}')
        .map_or(reference, |end| &reference[..=end]);
    raw.find(reference)
        .map_or(span.start, |offset| span.start + offset)
}

/// A place in the positioned document: a table, an item, or a value inside an inline table or
/// array.
#[derive(Clone, Copy)]
enum Node<'d> {
    Table(&'d toml_edit::Table),
    Item(&'d Item),
    Value(&'d toml_edit::Value),
}

impl<'d> Node<'d> {
    fn key(self, key: &str) -> Option<Node<'d>> {
        let table: &dyn TableLike = match self {
            Node::Table(table) => table,
            Node::Item(item) => item.as_table_like()?,
            Node::Value(value) => value.as_inline_table()?,
        };
        table.get(key).map(Node::Item)
    }

    fn index(self, index: usize) -> Option<Node<'d>> {
        match self {
            Node::Item(Item::ArrayOfTables(tables)) => tables.get(index).map(Node::Table),
            Node::Item(Item::Value(value)) | Node::Value(value) => {
                value.as_array()?.get(index).map(Node::Value)
            }
            _ => None,
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Table(table) => table.span(),
            Node::Item(item) => item.span(),
            Node::Value(value) => value.span(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn references_escapes_and_plain_dollars() {
        assert_eq!(expand("Bearer ${TOKEN}", &env).unwrap(), "Bearer s3cret");
        assert_eq!(expand("${TOKEN}${TOKEN}", &env).unwrap(), "s3crets3cret");
        assert_eq!(expand("a${EMPTY}b", &env).unwrap(), "ab");
        assert_eq!(expand("$${TOKEN}", &env).unwrap(), "${TOKEN}");
        assert_eq!(expand("$5 and $ and $$", &env).unwrap(), "$5 and $ and $$");
        assert_eq!(expand("no references", &env).unwrap(), "no references");
    }

    #[test]
    fn problems_point_at_the_reference() {
        let unset = expand("x ${NOPE} y", &env).unwrap_err();
        assert_eq!(unset.at, 2);
        assert!(unset.message.contains("`NOPE` is not set"), "{unset:?}");
        assert!(expand("${TOKEN", &env).is_err());
        assert!(expand("${}", &env).is_err());
        assert!(expand("${9X}", &env).is_err());
        assert!(expand("${A-B}", &env).is_err());
    }
}
