//! Segment's Filter Query Language (FQL), as its documentation describes it, so that a `where`
//! condition can be pasted from a Segment workspace.
//!
//! An expression is parsed once (when the config is read) into a tree and evaluated against
//! each event's JSON. Paths that do not exist are `null`; comparisons between different types
//! are `false`; the whole expression matches only when it evaluates to `true`.
//!
//! One file on purpose: the lexer, the parser and the evaluator are one grammar, read
//! together, and the tests below are its examples.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

/// A parsed FQL expression.
#[derive(Debug, Clone)]
pub struct Expr {
    root: Node,
}

/// Where an expression fails to parse: a byte offset into it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone)]
enum Node {
    Literal(Value),
    Path(Vec<String>),
    List(Vec<Node>),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Compare(Box<Node>, Op, Box<Node>),
    Call(Function, Vec<Node>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Function {
    Contains,
    Match,
    Length,
    Lowercase,
    Uppercase,
    Snakecase,
    Kebabcase,
    Titlecase,
    Typeof,
}

const FUNCTIONS: &[(&str, Function, usize)] = &[
    ("contains", Function::Contains, 2),
    ("match", Function::Match, 2),
    ("length", Function::Length, 1),
    ("lowercase", Function::Lowercase, 1),
    ("uppercase", Function::Uppercase, 1),
    ("snakecase", Function::Snakecase, 1),
    ("kebabcase", Function::Kebabcase, 1),
    ("titlecase", Function::Titlecase, 1),
    ("typeof", Function::Typeof, 1),
];

impl Expr {
    /// Parses `text`; the error's offset points at the offending token.
    pub fn parse(text: &str) -> Result<Expr, ParseError> {
        let tokens = lex(text)?;
        let mut parser = Parser {
            tokens,
            at: 0,
            end: text.len(),
        };
        let root = parser.or()?;
        match parser.peek() {
            None => Ok(Expr { root }),
            Some(token) => Err(ParseError {
                offset: token.offset,
                message: format!("unexpected {} after a complete expression", token.kind),
            }),
        }
    }

    /// Whether `event` matches: the expression evaluates to `true`.
    pub fn matches(&self, event: &Value) -> bool {
        matches!(eval(&self.root, event).as_ref(), Value::Bool(true))
    }
}

// ---- lexing ----

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Str(String),
    Num(f64),
    Ident(String),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Bang,
    Op(Op),
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Str(s) => write!(f, "string {s:?}"),
            Kind::Num(n) => write!(f, "number {n}"),
            Kind::Ident(name) => write!(f, "`{name}`"),
            Kind::LParen => f.write_str("`(`"),
            Kind::RParen => f.write_str("`)`"),
            Kind::LBracket => f.write_str("`[`"),
            Kind::RBracket => f.write_str("`]`"),
            Kind::Comma => f.write_str("`,`"),
            Kind::Bang => f.write_str("`!`"),
            Kind::Op(op) => write!(f, "`{}`", op_text(*op)),
        }
    }
}

fn op_text(op: Op) -> &'static str {
    match op {
        Op::Eq => "=",
        Op::Ne => "!=",
        Op::Lt => "<",
        Op::Le => "<=",
        Op::Gt => ">",
        Op::Ge => ">=",
        Op::In => "in",
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    offset: usize,
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'
}

fn lex(text: &str) -> Result<Vec<Token>, ParseError> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    let error = |offset, message: String| Err(ParseError { offset, message });
    while let Some(&(offset, c)) = chars.peek() {
        let single = match c {
            c if c.is_whitespace() => {
                chars.next();
                continue;
            }
            '(' => Some(Kind::LParen),
            ')' => Some(Kind::RParen),
            '[' => Some(Kind::LBracket),
            ']' => Some(Kind::RBracket),
            ',' => Some(Kind::Comma),
            _ => None,
        };
        if let Some(kind) = single {
            chars.next();
            tokens.push(Token { kind, offset });
            continue;
        }
        let kind = match c {
            '!' | '=' | '<' | '>' => {
                chars.next();
                let equals = chars.next_if(|&(_, next)| next == '=').is_some();
                match (c, equals) {
                    ('!', false) => Kind::Bang,
                    ('!', true) => Kind::Op(Op::Ne),
                    ('=', _) => {
                        // `==` is read as `=`, as people coming from other languages write it.
                        Kind::Op(Op::Eq)
                    }
                    ('<', false) => Kind::Op(Op::Lt),
                    ('<', true) => Kind::Op(Op::Le),
                    ('>', false) => Kind::Op(Op::Gt),
                    _ => Kind::Op(Op::Ge),
                }
            }
            '\'' | '"' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        None => return error(offset, "unterminated string".into()),
                        Some((_, ch)) if ch == c => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, 't')) => value.push('\t'),
                            Some((_, escaped)) => value.push(escaped),
                            None => return error(offset, "unterminated string".into()),
                        },
                        Some((_, ch)) => value.push(ch),
                    }
                }
                Kind::Str(value)
            }
            c if c.is_ascii_digit()
                || (c == '-' && text[offset + 1..].starts_with(|d: char| d.is_ascii_digit())) =>
            {
                let mut end = offset + c.len_utf8();
                chars.next();
                while let Some(&(at, d)) = chars.peek() {
                    if d.is_ascii_digit() || matches!(d, '.' | 'e' | 'E' | '+') {
                        end = at + 1;
                        chars.next();
                    } else {
                        break;
                    }
                }
                match text[offset..end].parse::<f64>() {
                    Ok(number) if number.is_finite() => Kind::Num(number),
                    _ => return error(offset, format!("bad number `{}`", &text[offset..end])),
                }
            }
            c if is_ident_char(c) || c == '\\' => {
                let mut name = String::new();
                while let Some(&(_, ch)) = chars.peek() {
                    if ch == '\\' {
                        chars.next();
                        match chars.next() {
                            // An escaped dot stays part of the field name.
                            Some((_, '.')) => name.push_str("\\."),
                            Some((_, escaped)) => name.push(escaped),
                            None => return error(offset, "`\\` at the end of a path".into()),
                        }
                    } else if is_ident_char(ch) {
                        name.push(ch);
                        chars.next();
                    } else {
                        break;
                    }
                }
                Kind::Ident(name)
            }
            other => return error(offset, format!("unexpected character `{other}`")),
        };
        tokens.push(Token { kind, offset });
    }
    Ok(tokens)
}

// ---- parsing ----

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    /// The text's length: where "unexpected end" is reported.
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token { kind: Kind::Ident(name), .. }) if name == word)
    }

    fn next(&mut self, wanted: &str) -> Result<Token, ParseError> {
        let token = self.tokens.get(self.at).cloned().ok_or(ParseError {
            offset: self.end,
            message: format!("the expression ends where {wanted} was expected"),
        })?;
        self.at += 1;
        Ok(token)
    }

    fn expect(&mut self, kind: Kind, wanted: &str) -> Result<(), ParseError> {
        let token = self.next(wanted)?;
        if token.kind == kind {
            Ok(())
        } else {
            Err(ParseError {
                offset: token.offset,
                message: format!("expected {wanted}, found {}", token.kind),
            })
        }
    }

    fn or(&mut self) -> Result<Node, ParseError> {
        let mut left = self.and()?;
        while self.keyword("or") {
            self.at += 1;
            left = Node::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Node, ParseError> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            self.at += 1;
            left = Node::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Node, ParseError> {
        if matches!(
            self.peek(),
            Some(Token {
                kind: Kind::Bang,
                ..
            })
        ) || self.keyword("not")
        {
            self.at += 1;
            return Ok(Node::Not(Box::new(self.unary()?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Node, ParseError> {
        let left = self.operand()?;
        let op = match self.peek() {
            Some(Token {
                kind: Kind::Op(op), ..
            }) => *op,
            Some(Token {
                kind: Kind::Ident(word),
                ..
            }) if word == "in" => Op::In,
            _ => return Ok(left),
        };
        self.at += 1;
        let right = self.operand()?;
        Ok(Node::Compare(Box::new(left), op, Box::new(right)))
    }

    fn operand(&mut self) -> Result<Node, ParseError> {
        let token = self.next("a value, a field or `(`")?;
        let node = match token.kind {
            Kind::Str(text) => Node::Literal(Value::String(text)),
            Kind::Num(number) => Node::Literal(number_value(number)),
            Kind::LParen => {
                let inner = self.or()?;
                self.expect(Kind::RParen, "`)`")?;
                inner
            }
            Kind::LBracket => {
                let mut items = Vec::new();
                if matches!(
                    self.peek(),
                    Some(Token {
                        kind: Kind::RBracket,
                        ..
                    })
                ) {
                    self.at += 1;
                } else {
                    loop {
                        items.push(self.operand()?);
                        let token = self.next("`,` or `]`")?;
                        match token.kind {
                            Kind::Comma => continue,
                            Kind::RBracket => break,
                            other => {
                                return Err(ParseError {
                                    offset: token.offset,
                                    message: format!("expected `,` or `]`, found {other}"),
                                })
                            }
                        }
                    }
                }
                Node::List(items)
            }
            Kind::Ident(name) => self.named(name, token.offset)?,
            other => {
                return Err(ParseError {
                    offset: token.offset,
                    message: format!("expected a value, a field or `(`, found {other}"),
                })
            }
        };
        Ok(node)
    }

    /// A keyword value, a function call or a field path.
    fn named(&mut self, name: String, offset: usize) -> Result<Node, ParseError> {
        let reserved = |word: &str| ParseError {
            offset,
            message: format!("expected a value, a field or `(`, found `{word}`"),
        };
        match name.as_str() {
            "true" => return Ok(Node::Literal(Value::Bool(true))),
            "false" => return Ok(Node::Literal(Value::Bool(false))),
            "null" => return Ok(Node::Literal(Value::Null)),
            "and" | "or" | "in" => return Err(reserved(&name)),
            _ => {}
        }
        if matches!(
            self.peek(),
            Some(Token {
                kind: Kind::LParen,
                ..
            })
        ) {
            let Some(&(_, function, arity)) = FUNCTIONS.iter().find(|(n, _, _)| *n == name) else {
                let known: Vec<&str> = FUNCTIONS.iter().map(|(n, _, _)| *n).collect();
                return Err(ParseError {
                    offset,
                    message: format!("unknown function `{name}` (known: {})", known.join(", ")),
                });
            };
            self.at += 1;
            let mut args = Vec::new();
            if matches!(
                self.peek(),
                Some(Token {
                    kind: Kind::RParen,
                    ..
                })
            ) {
                self.at += 1;
            } else {
                loop {
                    args.push(self.or()?);
                    let token = self.next("`,` or `)`")?;
                    match token.kind {
                        Kind::Comma => continue,
                        Kind::RParen => break,
                        other => {
                            return Err(ParseError {
                                offset: token.offset,
                                message: format!("expected `,` or `)`, found {other}"),
                            })
                        }
                    }
                }
            }
            if args.len() != arity {
                return Err(ParseError {
                    offset,
                    message: format!(
                        "`{name}` takes {arity} argument{}, not {}",
                        if arity == 1 { "" } else { "s" },
                        args.len()
                    ),
                });
            }
            return Ok(Node::Call(function, args));
        }
        let path = split_path(&name).ok_or_else(|| ParseError {
            offset,
            message: format!("bad field path `{name}`"),
        })?;
        Ok(Node::Path(path))
    }
}

/// `a.b\.c` → `["a", "b.c"]`; `None` for an empty segment.
fn split_path(name: &str) -> Option<Vec<String>> {
    let mut segments = vec![String::new()];
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => segments.last_mut()?.push(chars.next()?),
            '.' => segments.push(String::new()),
            c => segments.last_mut()?.push(c),
        }
    }
    (!segments.iter().any(String::is_empty)).then_some(segments)
}

fn number_value(number: f64) -> Value {
    serde_json::Number::from_f64(number).map_or(Value::Null, Value::Number)
}

// ---- evaluation ----

fn eval<'a>(node: &'a Node, event: &'a Value) -> Cow<'a, Value> {
    match node {
        Node::Literal(value) => Cow::Borrowed(value),
        Node::Path(path) => Cow::Borrowed(lookup(event, path).unwrap_or(&Value::Null)),
        Node::List(items) => Cow::Owned(Value::Array(
            items
                .iter()
                .map(|item| eval(item, event).into_owned())
                .collect(),
        )),
        Node::Not(inner) => Cow::Owned(Value::Bool(!truthy(&eval(inner, event)))),
        Node::And(left, right) => Cow::Owned(Value::Bool(
            truthy(&eval(left, event)) && truthy(&eval(right, event)),
        )),
        Node::Or(left, right) => Cow::Owned(Value::Bool(
            truthy(&eval(left, event)) || truthy(&eval(right, event)),
        )),
        Node::Compare(left, op, right) => Cow::Owned(Value::Bool(compare(
            &eval(left, event),
            *op,
            &eval(right, event),
        ))),
        Node::Call(function, args) => {
            let args: Vec<Cow<Value>> = args.iter().map(|arg| eval(arg, event)).collect();
            Cow::Owned(call(*function, &args))
        }
    }
}

/// The value at `path` (array elements by index); `None` when any step is missing.
pub fn lookup<'a>(event: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(event, |value, segment| match value {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
        _ => None,
    })
}

/// `and`, `or` and `!` take booleans; anything else (`null` included) counts as false.
fn truthy(value: &Value) -> bool {
    matches!(value, Value::Bool(true))
}

fn compare(left: &Value, op: Op, right: &Value) -> bool {
    match op {
        Op::Eq => strictly_equal(left, right),
        Op::Ne => !strictly_equal(left, right),
        Op::In => match right {
            Value::Array(items) => items.iter().any(|item| strictly_equal(left, item)),
            _ => false,
        },
        Op::Lt | Op::Le | Op::Gt | Op::Ge => {
            let (Some(a), Some(b)) = (left.as_f64(), right.as_f64()) else {
                return false;
            };
            match op {
                Op::Lt => a < b,
                Op::Le => a <= b,
                Op::Gt => a > b,
                _ => a >= b,
            }
        }
    }
}

/// Same type and equal; numbers by value (`1 = 1.0`).
fn strictly_equal(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| strictly_equal(x, y))
        }
        _ => left == right,
    }
}

fn call(function: Function, args: &[Cow<Value>]) -> Value {
    let text = |index: usize| args.get(index).and_then(|v| v.as_str());
    let map_text = |f: &dyn Fn(&str) -> String| match text(0) {
        Some(s) => Value::String(f(s)),
        None => Value::Null,
    };
    match function {
        Function::Contains => Value::Bool(match (text(0), text(1)) {
            (Some(s), Some(sub)) => s.contains(sub),
            _ => false,
        }),
        Function::Match => Value::Bool(match (text(0), text(1)) {
            (Some(s), Some(pattern)) => glob(pattern, s),
            _ => false,
        }),
        Function::Length => {
            let length = match args[0].as_ref() {
                Value::String(s) => s.len(),
                Value::Array(items) => items.len(),
                _ => 0,
            };
            Value::from(length)
        }
        Function::Lowercase => map_text(&str::to_lowercase),
        Function::Uppercase => map_text(&str::to_uppercase),
        Function::Snakecase => map_text(&|s| s.replace(' ', "_")),
        Function::Kebabcase => map_text(&|s| s.replace(' ', "-")),
        Function::Titlecase => map_text(&titlecase),
        Function::Typeof => Value::String(
            match args[0].as_ref() {
                Value::String(_) => "string",
                Value::Number(_) => "number",
                Value::Array(_) => "list",
                Value::Bool(_) => "bool",
                Value::Null => "null",
                Value::Object(_) => "object",
            }
            .to_owned(),
        ),
    }
}

fn titlecase(s: &str) -> String {
    s.split(' ')
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Glob matching of the whole of `text`: `*`, `?`, `[abc]`, `[a-z]`, `[!a]`/`[^a]`, `\x`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    // Iterative with one backtrack point for the last `*`: linear in practice, never exponential.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                '*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                '?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class(&pattern, p, text[t]) {
                        if matched {
                            p = next;
                            t += 1;
                            continue;
                        }
                    } else if text[t] == '[' {
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
                '\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == text[t] {
                        p += 2;
                        t += 1;
                        continue;
                    }
                }
                c => {
                    if c == text[t] {
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((star_p, star_t)) => {
                p = star_p + 1;
                t = star_t + 1;
                star = Some((star_p, star_t + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// A `[...]` class at `pattern[start]` against `c`: whether it matched, and where the pattern
/// goes on; `None` when the class is not closed (then `[` is a plain character).
fn class(pattern: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negated = matches!(pattern.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let mut low = *pattern.get(i)?;
        if low == ']' && !first {
            return Some((matched != negated, i + 1));
        }
        first = false;
        if low == '\\' {
            i += 1;
            low = *pattern.get(i)?;
        }
        if pattern.get(i + 1) == Some(&'-') && pattern.get(i + 2).is_some_and(|&h| h != ']') {
            let high = pattern[i + 2];
            matched |= low <= c && c <= high;
            i += 3;
        } else {
            matched |= low == c;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn docs_event() -> Value {
        json!({
            "event": "Button Clicked",
            "type": "track",
            "context": {"library": {"name": "analytics.js", "version": "1.0"}},
            "properties": {"features": ["discounts", "dark-mode"]}
        })
    }

    fn eval_on(text: &str, event: &Value) -> bool {
        Expr::parse(text)
            .unwrap_or_else(|e| panic!("{text}: {e} at {}", e.offset))
            .matches(event)
    }

    #[test]
    fn the_examples_of_segments_documentation() {
        let event = docs_event();
        let cases = [
            ("event = 'Button Clicked'", true),
            ("event = 'Screen Tapped'", false),
            ("context.path.path = '/login'", false),
            ("type = 'identify' or type = 'track'", true),
            ("event = 'Button Clicked' and type = 'track'", true),
            ("match( context.library.version, '1.*' )", true),
            ("match( context.library.version, '2.*' )", false),
            (
                "type = 'track' and ( event = 'Click' or match( event, 'Button *' ) )",
                true,
            ),
            ("!contains( context.library.name, 'js' )", false),
            ("'dark-mode' in properties.features", true),
            ("'blink' in properties.features", false),
            ("!( type in ['track', 'identify'] )", false),
        ];
        for (text, expected) in cases {
            assert_eq!(eval_on(text, &event), expected, "{text}");
        }
    }

    #[test]
    fn the_glob_examples_of_segments_documentation() {
        let cases = [
            ("abcd", "a*d", true),
            ("", "*", true),
            ("abc", "ab", false),
            ("abcd", "a??d", true),
            ("abcd", "*d", true),
            ("ab*d", "ab\\*d", true),
            ("abCd", "ab[cC]d", true),
            ("abcd", "ab[a-z]d", true),
            ("abcd", "ab[A-Z]d", false),
        ];
        for (text, pattern, expected) in cases {
            assert_eq!(glob(pattern, text), expected, "{text} ~ {pattern}");
            // The same through the language, with the escape written FQL's way.
            let fql = format!("match('{text}', '{}')", pattern.replace('\\', "\\\\"));
            assert_eq!(eval_on(&fql, &Value::Null), expected, "{fql}");
        }
        assert!(glob("a*b*c", "aXbYbZc"));
        assert!(!glob("a*b*c", "aXbYbZ"));
        assert!(glob("[!a]x", "bx") && !glob("[^a]x", "ax"));
        assert!(glob("é?", "éa"), "characters, not bytes");
        let long = "a".repeat(10_000);
        assert!(!glob("*a*a*a*a*a*b", &long), "no exponential backtracking");
    }

    #[test]
    fn every_comparison_operator() {
        let event = json!({"properties": {"price": 10, "name": "x", "tags": ["a"], "ok": true}});
        let cases = [
            ("properties.price = 10", true),
            ("properties.price = 10.0", true),
            ("properties.price == 10", true),
            ("properties.price = '10'", false),
            ("properties.price != 10", false),
            ("properties.price != '10'", true),
            ("properties.price < 11", true),
            ("properties.price < 10", false),
            ("properties.price <= 10", true),
            ("properties.price > 9.5", true),
            ("properties.price > 10", false),
            ("properties.price >= 10", true),
            ("properties.price >= -1", true),
            ("properties.name > 1", false),
            ("properties.name = 'x'", true),
            ("properties.tags = ['a']", true),
            ("properties.tags != ['a', 'b']", true),
            ("properties.ok = true", true),
            ("properties.ok", true),
            ("properties.missing = null", true),
            ("properties.missing != null", false),
            ("properties.price in [1, 10]", true),
            ("properties.name in ['y']", false),
            ("null in [null]", true),
            ("properties.price in 10", false),
        ];
        for (text, expected) in cases {
            assert_eq!(eval_on(text, &event), expected, "{text}");
        }
    }

    #[test]
    fn boolean_operators_precedence_and_null() {
        let event = json!({"a": true, "b": false, "n": null});
        let cases = [
            ("a and b", false),
            ("a or b", true),
            ("!b", true),
            ("not b", true),
            ("!n", true),
            ("n or a", true),
            ("n and a", false),
            ("b and b or a", true),
            ("a or b and b", true),
            ("(a or b) and b", false),
            ("!(a and b)", true),
            ("!!a", true),
            ("true", true),
            ("false", false),
            ("null", false),
            ("'text'", false),
        ];
        for (text, expected) in cases {
            assert_eq!(eval_on(text, &event), expected, "{text}");
        }
    }

    #[test]
    fn every_function_and_its_null_default() {
        let event = json!({
            "userId": "Ann Lee", "tags": ["a", "b", "c"], "n": 5, "k": "ア", "o": {"x": 1}
        });
        let cases = [
            ("contains(userId, 'Lee')", true),
            ("contains(userId, 'lee')", false),
            ("contains(missing, 'x')", false),
            ("match(missing, '*')", false),
            ("length(tags) = 3", true),
            ("length(userId) = 7", true),
            ("length(k) = 3", true),
            ("length(missing) = 0", true),
            ("length(userId) > 0", true),
            ("lowercase(userId) = 'ann lee'", true),
            ("lowercase(missing) = null", true),
            ("uppercase(userId) = 'ANN LEE'", true),
            ("snakecase(userId) = 'Ann_Lee'", true),
            ("kebabcase(userId) = 'Ann-Lee'", true),
            ("titlecase('test string') = 'Test String'", true),
            ("typeof(userId) = 'string'", true),
            ("typeof(n) = 'number'", true),
            ("typeof(tags) = 'list'", true),
            ("typeof(true) = 'bool'", true),
            ("typeof(missing) = 'null'", true),
            ("typeof(o) = 'object'", true),
            ("match(lowercase(userId), 'ann*')", true),
        ];
        for (text, expected) in cases {
            assert_eq!(eval_on(text, &event), expected, "{text}");
        }
    }

    #[test]
    fn paths_escapes_and_indexes() {
        let event = json!({
            "properties": {"product 1": {"price": "19.99"}, "a.b": 1, "items": [{"sku": "x"}]},
            "context": {"library": {"name": "analytics-node"}}
        });
        assert!(eval_on("properties.product\\ 1.price = '19.99'", &event));
        assert!(eval_on("properties.a\\.b = 1", &event));
        assert!(eval_on("properties.items.0.sku = \"x\"", &event));
        assert!(eval_on("context.library.name = 'analytics-node'", &event));
        assert!(eval_on("'it\\'s' = \"it's\"", &Value::Null));
    }

    #[test]
    fn errors_say_where() {
        let cases = [
            ("userId = oops\"", 13, "unterminated string"),
            ("type = ", 7, "the expression ends"),
            ("type = 'track' and", 18, "the expression ends"),
            ("(type = 'track'", 15, "the expression ends"),
            ("type = 'track')", 14, "unexpected `)`"),
            ("frobnicate(event)", 0, "unknown function `frobnicate`"),
            ("contains(event)", 0, "`contains` takes 2 arguments, not 1"),
            ("type = 'a' = 'b'", 11, "unexpected `=`"),
            ("type # 'a'", 5, "unexpected character `#`"),
            ("a..b = 1", 0, "bad field path"),
            ("[1, 2 = 1", 6, "expected `,` or `]`"),
            ("and = 1", 0, "found `and`"),
        ];
        for (text, offset, message) in cases {
            let error = Expr::parse(text).expect_err(text);
            assert_eq!(error.offset, offset, "{text}: {}", error.message);
            assert!(error.message.contains(message), "{text}: {}", error.message);
        }
    }
}
