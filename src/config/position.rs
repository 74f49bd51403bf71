//! Where things are in the config file: the TOML parsed a second time with positions
//! (`toml_edit`), so that every problem is reported as `file:line:col`.

use toml_edit::{ImDocument, Item, Key, TableLike};

/// The file's values, and the same file parsed with positions; or the syntax error, located.
pub(super) fn parse_toml(text: &str) -> Result<(toml::Table, ImDocument<&str>), (usize, String)> {
    let syntax = |span: Option<std::ops::Range<usize>>, message: &str| {
        let message = message.trim().replace('\n', "; ");
        (span.map_or(0, |span| span.start), message)
    };
    let values = toml::from_str::<toml::Table>(text).map_err(|e| syntax(e.span(), e.message()))?;
    let document = ImDocument::parse(text).map_err(|e| syntax(e.span(), e.message()))?;
    Ok((values, document))
}

/// Where byte `decoded` of a string value sits in the file, relative to the value's start
/// (`raw`, from its opening quote on): past the quotes, and past each escape in a basic string.
pub(super) fn string_offset(raw: &str, decoded: usize) -> usize {
    let (quote, literal) = if raw.starts_with("'''") || raw.starts_with("\"\"\"") {
        let skip = if raw[3..].starts_with('\n') { 4 } else { 3 };
        (skip, raw.starts_with('\''))
    } else {
        (1, raw.starts_with('\''))
    };
    let body = &raw[quote.min(raw.len())..];
    if literal {
        return quote + decoded;
    }
    let (mut read, mut written) = (0, 0);
    let mut chars = body.char_indices();
    while written < decoded {
        let Some((at, c)) = chars.next() else {
            break;
        };
        read = at + c.len_utf8();
        if c == '\\' {
            // `\uXXXX` and `\UXXXXXXXX` stand for one character; other escapes for one byte.
            let width = match chars.next() {
                Some((_, 'u')) => 4,
                Some((_, 'U')) => 8,
                Some((at, escaped)) => {
                    read = at + escaped.len_utf8();
                    written += 1;
                    continue;
                }
                None => break,
            };
            let mut code = String::new();
            for _ in 0..width {
                if let Some((at, hex)) = chars.next() {
                    code.push(hex);
                    read = at + 1;
                }
            }
            written += u32::from_str_radix(&code, 16)
                .ok()
                .and_then(char::from_u32)
                .map_or(1, char::len_utf8);
        } else {
            written += c.len_utf8();
        }
    }
    quote + read
}

/// 1-based line and character column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// Where one table sits in the file, to locate its problems.
#[derive(Clone, Copy)]
pub(super) struct Place<'d> {
    /// The table as parsed with positions; `None` if it is not one there (every problem is then
    /// reported at `start`).
    pub(super) table: Option<&'d dyn TableLike>,
    /// Where the table starts (its `[header]`, or its key when dotted or inline); a missing key
    /// is reported here.
    pub(super) start: usize,
}

impl<'d> Place<'d> {
    pub(super) fn item(&self, key: &str) -> Option<&'d Item> {
        self.table?.get(key)
    }

    pub(super) fn key(&self, key: &str) -> usize {
        self.table
            .and_then(|table| table.key(key))
            .and_then(Key::span)
            .map_or(self.start, |span| span.start)
    }

    pub(super) fn value(&self, key: &str) -> usize {
        self.item(key)
            .and_then(Item::span)
            .map_or_else(|| self.key(key), |span| span.start)
    }

    pub(super) fn table(&self, key: &str) -> Place<'d> {
        Place {
            table: self.item(key).and_then(Item::as_table_like),
            start: self.value(key),
        }
    }

    /// Element `index` of the array (of tables, or of values) at `key`.
    pub(super) fn element(&self, key: &str, index: usize) -> Place<'d> {
        let element = match self.item(key) {
            Some(Item::ArrayOfTables(tables)) => tables
                .get(index)
                .map(|table| (Some(table as &dyn TableLike), table.span())),
            Some(Item::Value(toml_edit::Value::Array(array))) => array.get(index).map(|value| {
                let table = value.as_inline_table().map(|t| t as &dyn TableLike);
                (table, value.span())
            }),
            _ => None,
        };
        let (table, span) = element.unwrap_or((None, None));
        Place {
            table,
            start: span.map_or_else(|| self.value(key), |span| span.start),
        }
    }
}

/// One table of the file: its values, where it sits, and the name of its keys in messages.
#[derive(Clone, Copy)]
pub(super) struct Section<'v, 'd> {
    pub(super) values: &'v toml::Table,
    pub(super) place: Place<'d>,
    /// The key of a nested table (`retry`, `limits`), which prefixes its keys in messages.
    pub(super) path: Option<&'static str>,
}

impl Section<'_, '_> {
    pub(super) fn name(&self, key: &str) -> String {
        match self.path {
            Some(path) => format!("{path}.{key}"),
            None => key.to_owned(),
        }
    }
}
