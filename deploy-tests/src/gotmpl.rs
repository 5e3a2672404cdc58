//! A renderer for the subset of Go's text/template (plus the few Sprig and
//! Helm functions) that the Ambit chart uses, so the chart can be rendered
//! and checked without Helm, which this workspace cannot install.
//!
//! The subset: text with `{{ }}` actions and `{{-`/`-}}` trimming, comments,
//! `if`/`else if`/`else`, `with`/`else`, `range`/`else` over lists and maps
//! (`.` is each element), `define`, `template`, pipelines with `|`, `.`,
//! `.a.b` fields, `$` and `$.a.b`, string/number/boolean literals and
//! parenthesised pipelines; the functions in [`FUNCTIONS`].
//!
//! Everything outside it is an error, never a silently empty output:
//! variables (`$x :=`), `block`, `break`, unknown functions, and printing a
//! missing value (Go would print `<no value>`, Helm an empty string — both
//! hide a typo in a values path) or a map or list (which needs `toYaml`).

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

/// The functions the renderer implements, with Sprig's/Helm's meaning.
pub const FUNCTIONS: [&str; 14] = [
    "include",
    "toYaml",
    "nindent",
    "indent",
    "quote",
    "default",
    "required",
    "printf",
    "eq",
    "ne",
    "not",
    "and",
    "or",
    "trimSuffix",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

type Result<T> = std::result::Result<T, Error>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

#[derive(Debug, Clone)]
enum Arg {
    Dot,
    Field(Vec<String>),
    Root(Vec<String>),
    Str(String),
    Int(i64),
    Bool(bool),
    Func(String),
    Sub(Vec<Cmd>),
}

#[derive(Debug, Clone)]
struct Cmd(Vec<Arg>);

type Pipeline = Vec<Cmd>;

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Print(Pipeline),
    If(Vec<(Pipeline, Vec<Node>)>, Vec<Node>),
    With(Pipeline, Vec<Node>, Vec<Node>),
    Range(Pipeline, Vec<Node>, Vec<Node>),
    Template(String, Pipeline),
}

/// A set of parsed templates: the files' bodies and every `define`.
#[derive(Default)]
pub struct Templates {
    files: BTreeMap<String, Vec<Node>>,
    defines: BTreeMap<String, Vec<Node>>,
}

/// One lexical piece of a template file.
enum Piece {
    Text(String),
    Action(String, usize),
}

/// Splits `src` into text and action bodies, applying `{{-`/`-}}` trimming.
fn split(src: &str, file: &str) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut rest = src;
    let mut line = 1;
    let mut trim_next = false;
    while let Some(open) = rest.find("{{") {
        let mut text = rest[..open].to_string();
        if trim_next {
            text = text.trim_start().to_string();
        }
        line += rest[..open].matches('\n').count();
        let after = &rest[open + 2..];
        let trim_left = after.starts_with("- ") || after.starts_with("-\n");
        if trim_left {
            text = text.trim_end().to_string();
        }
        pieces.push(Piece::Text(text));
        let body_start = if trim_left { 2 } else { 0 };
        let close = find_close(&after[body_start..])
            .ok_or_else(|| Error(format!("{file}:{line}: unclosed action")))?;
        let mut body = &after[body_start..body_start + close];
        trim_next = body.ends_with(" -") || body.ends_with("\n-");
        if trim_next {
            body = &body[..body.len() - 2];
        }
        pieces.push(Piece::Action(body.trim().to_string(), line));
        line += body.matches('\n').count();
        rest = &after[body_start + close + 2..];
    }
    let mut text = rest.to_string();
    if trim_next {
        text = text.trim_start().to_string();
    }
    pieces.push(Piece::Text(text));
    Ok(pieces)
}

/// Index of the `}}` closing an action, skipping quoted strings.
fn find_close(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'`' => {
                i += 1;
                while i < b.len() && b[i] != b'`' {
                    i += 1;
                }
            }
            b'}' if b.get(i + 1) == Some(&b'}') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Pipe,
    Open,
    Close,
}

fn lex(body: &str, at: &str) -> Result<Vec<Tok>> {
    let mut toks = Vec::new();
    let chars: Vec<char> = body.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '|' => {
                toks.push(Tok::Pipe);
                i += 1;
            }
            '(' => {
                toks.push(Tok::Open);
                i += 1;
            }
            ')' => {
                toks.push(Tok::Close);
                i += 1;
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return err(format!("{at}: unterminated string")),
                        Some('"') => break,
                        Some('\\') => {
                            i += 1;
                            match chars.get(i) {
                                Some('n') => s.push('\n'),
                                Some('t') => s.push('\t'),
                                Some('"') => s.push('"'),
                                Some('\\') => s.push('\\'),
                                other => {
                                    return err(format!("{at}: unsupported escape \\{other:?}"))
                                }
                            }
                        }
                        Some(&c) => s.push(c),
                    }
                    i += 1;
                }
                i += 1;
                toks.push(Tok::Str(s));
            }
            '`' => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '`')
                    .ok_or_else(|| Error(format!("{at}: unterminated raw string")))?;
                toks.push(Tok::Str(chars[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            _ => {
                let start = i;
                while i < chars.len() && !chars[i].is_whitespace() && !"|()\"".contains(chars[i]) {
                    i += 1;
                }
                toks.push(Tok::Word(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(toks)
}

fn parse_pipeline(toks: &[Tok], at: &str) -> Result<Pipeline> {
    let mut pos = 0;
    let p = pipeline(toks, &mut pos, at)?;
    if pos != toks.len() {
        return err(format!("{at}: unexpected {:?}", toks[pos]));
    }
    Ok(p)
}

fn pipeline(toks: &[Tok], pos: &mut usize, at: &str) -> Result<Pipeline> {
    let mut cmds = Vec::new();
    let mut args = Vec::new();
    while *pos < toks.len() {
        match &toks[*pos] {
            Tok::Close => break,
            Tok::Pipe => {
                if args.is_empty() {
                    return err(format!("{at}: empty command in pipeline"));
                }
                cmds.push(Cmd(std::mem::take(&mut args)));
                *pos += 1;
            }
            Tok::Open => {
                *pos += 1;
                let sub = pipeline(toks, pos, at)?;
                if toks.get(*pos) != Some(&Tok::Close) {
                    return err(format!("{at}: unclosed parenthesis"));
                }
                *pos += 1;
                args.push(Arg::Sub(sub));
            }
            Tok::Str(s) => {
                args.push(Arg::Str(s.clone()));
                *pos += 1;
            }
            Tok::Word(w) => {
                args.push(word(w, at)?);
                *pos += 1;
            }
        }
    }
    if args.is_empty() {
        return err(format!("{at}: empty pipeline"));
    }
    cmds.push(Cmd(args));
    for (i, c) in cmds.iter().enumerate() {
        if i > 0 && !matches!(c.0[0], Arg::Func(_)) {
            return err(format!("{at}: a pipeline stage must be a function"));
        }
        if c.0.len() > 1 && !matches!(c.0[0], Arg::Func(_)) {
            return err(format!("{at}: arguments given to a non-function"));
        }
    }
    Ok(cmds)
}

fn path(s: &str, at: &str) -> Result<Vec<String>> {
    let parts: Vec<String> = s.split('.').map(str::to_string).collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return err(format!("{at}: unsupported field path .{s}"));
    }
    Ok(parts)
}

fn word(w: &str, at: &str) -> Result<Arg> {
    if w == "." {
        return Ok(Arg::Dot);
    }
    if let Some(rest) = w.strip_prefix('.') {
        return Ok(Arg::Field(path(rest, at)?));
    }
    if w == "$" {
        return Ok(Arg::Root(Vec::new()));
    }
    if let Some(rest) = w.strip_prefix("$.") {
        return Ok(Arg::Root(path(rest, at)?));
    }
    if w.starts_with('$') || w == ":=" || w == "=" {
        return err(format!("{at}: variables ({w}) are not supported"));
    }
    if w == "true" || w == "false" {
        return Ok(Arg::Bool(w == "true"));
    }
    if let Ok(n) = w.parse::<i64>() {
        return Ok(Arg::Int(n));
    }
    if FUNCTIONS.contains(&w) {
        return Ok(Arg::Func(w.to_string()));
    }
    err(format!("{at}: unsupported function or token {w:?}"))
}

/// What an action is, before the tree is built.
enum Act {
    Print(Pipeline),
    If(Pipeline),
    ElseIf(Pipeline),
    Else,
    End,
    With(Pipeline),
    Range(Pipeline),
    Define(String),
    Template(String, Pipeline),
}

fn action(body: &str, at: &str) -> Result<Option<Act>> {
    if body.starts_with("/*") {
        if !body.ends_with("*/") {
            return err(format!("{at}: a comment must be the whole action"));
        }
        return Ok(None);
    }
    let toks = lex(body, at)?;
    let head = match toks.first() {
        Some(Tok::Word(w)) => w.as_str(),
        Some(_) => return Ok(Some(Act::Print(parse_pipeline(&toks, at)?))),
        None => return err(format!("{at}: empty action")),
    };
    let rest = &toks[1..];
    let name_and_pipe = |rest: &[Tok]| -> Result<(String, Pipeline)> {
        match rest.first() {
            Some(Tok::Str(name)) => {
                let pipe = if rest.len() > 1 {
                    parse_pipeline(&rest[1..], at)?
                } else {
                    vec![Cmd(vec![Arg::Dot])]
                };
                Ok((name.clone(), pipe))
            }
            _ => err(format!("{at}: {head} needs a quoted name")),
        }
    };
    Ok(Some(match head {
        "if" => Act::If(parse_pipeline(rest, at)?),
        "else" => match rest.first() {
            None => Act::Else,
            Some(Tok::Word(w)) if w == "if" => Act::ElseIf(parse_pipeline(&rest[1..], at)?),
            Some(_) => return err(format!("{at}: only `else` and `else if` are supported")),
        },
        "end" if rest.is_empty() => Act::End,
        "with" => Act::With(parse_pipeline(rest, at)?),
        "range" => Act::Range(parse_pipeline(rest, at)?),
        "define" => {
            let (name, _) = name_and_pipe(rest)?;
            if rest.len() != 1 {
                return err(format!("{at}: define takes only a name"));
            }
            Act::Define(name)
        }
        "template" => {
            let (name, pipe) = name_and_pipe(rest)?;
            Act::Template(name, pipe)
        }
        "block" | "break" | "continue" | "end" | "nil" => {
            return err(format!("{at}: `{head}` is not supported"))
        }
        _ => Act::Print(parse_pipeline(&toks, at)?),
    }))
}

/// Builds nodes until an `else`/`end` (returned) at this depth.
fn build(items: &mut Items, defines: &mut BTreeMap<String, Vec<Node>>) -> Result<Built> {
    let mut nodes = Vec::new();
    while let Some((act, text, at)) = items.next() {
        if !text.is_empty() {
            nodes.push(Node::Text(text));
        }
        let Some(act) = act else { continue };
        match act {
            Act::Print(p) => nodes.push(Node::Print(p)),
            Act::Template(name, p) => nodes.push(Node::Template(name, p)),
            Act::Else | Act::ElseIf(_) | Act::End => return Ok((nodes, Some((act, at)))),
            Act::If(cond) => {
                let mut branches = Vec::new();
                let mut cond = cond;
                let otherwise = loop {
                    let (body, stop) = build(items, defines)?;
                    branches.push((cond, body));
                    match stop {
                        Some((Act::ElseIf(c), _)) => cond = c,
                        Some((Act::Else, _)) => {
                            let (body, stop) = build(items, defines)?;
                            expect_end(stop, &at)?;
                            break body;
                        }
                        Some((Act::End, _)) => break Vec::new(),
                        _ => return err(format!("{at}: `if` without `end`")),
                    }
                };
                nodes.push(Node::If(branches, otherwise));
            }
            Act::With(p) => {
                let (body, otherwise) = block_body(items, defines, &at)?;
                nodes.push(Node::With(p, body, otherwise));
            }
            Act::Range(p) => {
                let (body, otherwise) = block_body(items, defines, &at)?;
                nodes.push(Node::Range(p, body, otherwise));
            }
            Act::Define(name) => {
                let (body, stop) = build(items, defines)?;
                expect_end(stop, &at)?;
                if defines.insert(name.clone(), body).is_some() {
                    return err(format!("{at}: template {name:?} defined twice"));
                }
            }
        }
    }
    Ok((nodes, None))
}

/// Nodes built, and the `else`/`end` that stopped them (with its location).
type Built = (Vec<Node>, Option<(Act, String)>);

type Items = std::iter::Peekable<std::vec::IntoIter<(Option<Act>, String, String)>>;

/// The body and `else` body of a `with` or `range`.
fn block_body(
    items: &mut Items,
    defines: &mut BTreeMap<String, Vec<Node>>,
    at: &str,
) -> Result<(Vec<Node>, Vec<Node>)> {
    let (body, stop) = build(items, defines)?;
    let otherwise = match stop {
        Some((Act::Else, _)) => {
            let (b, stop) = build(items, defines)?;
            expect_end(stop, at)?;
            b
        }
        Some((Act::End, _)) => Vec::new(),
        _ => return err(format!("{at}: block without `end`")),
    };
    Ok((body, otherwise))
}

fn expect_end(stop: Option<(Act, String)>, at: &str) -> Result<()> {
    match stop {
        Some((Act::End, _)) => Ok(()),
        _ => err(format!("{at}: block without `end`")),
    }
}

impl Templates {
    /// Parses one file; its `define`s join the shared set.
    pub fn add(&mut self, name: &str, src: &str) -> Result<()> {
        let pieces = split(src, name)?;
        let mut items = Vec::new();
        let mut pending_text = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => pending_text.push_str(&t),
                Piece::Action(body, line) => {
                    let at = format!("{name}:{line}");
                    let act = action(&body, &at)?;
                    items.push((act, std::mem::take(&mut pending_text), at));
                }
            }
        }
        items.push((None, pending_text, format!("{name}:end")));
        let mut iter = items.into_iter().peekable();
        let (nodes, stop) = build(&mut iter, &mut self.defines)?;
        if let Some((_, at)) = stop {
            return err(format!("{at}: `else` or `end` without a block"));
        }
        self.files.insert(name.to_string(), nodes);
        Ok(())
    }

    /// Renders file `name` with `root` as both `.` and `$`.
    pub fn render(&self, name: &str, root: &Value) -> Result<String> {
        let nodes = self
            .files
            .get(name)
            .ok_or_else(|| Error(format!("no template file {name}")))?;
        let mut out = String::new();
        self.exec(nodes, root, root, &mut out, 0)?;
        Ok(out)
    }

    fn exec(
        &self,
        nodes: &[Node],
        dot: &Value,
        root: &Value,
        out: &mut String,
        depth: usize,
    ) -> Result<()> {
        for n in nodes {
            match n {
                Node::Text(t) => out.push_str(t),
                Node::Print(p) => {
                    let v = self.pipe(p, dot, root, depth)?;
                    out.push_str(&printable(&v)?);
                }
                Node::If(branches, otherwise) => {
                    let mut done = false;
                    for (cond, body) in branches {
                        if truthy(&self.pipe(cond, dot, root, depth)?) {
                            self.exec(body, dot, root, out, depth)?;
                            done = true;
                            break;
                        }
                    }
                    if !done {
                        self.exec(otherwise, dot, root, out, depth)?;
                    }
                }
                Node::With(p, body, otherwise) => {
                    let v = self.pipe(p, dot, root, depth)?;
                    if truthy(&v) {
                        self.exec(body, &v, root, out, depth)?;
                    } else {
                        self.exec(otherwise, dot, root, out, depth)?;
                    }
                }
                Node::Range(p, body, otherwise) => {
                    let v = self.pipe(p, dot, root, depth)?;
                    let items: Vec<Value> = match &v {
                        Value::Array(a) => a.clone(),
                        // Go ranges over a map in key order.
                        Value::Object(o) => {
                            let mut keys: Vec<&String> = o.keys().collect();
                            keys.sort();
                            keys.into_iter().map(|k| o[k].clone()).collect()
                        }
                        Value::Null => Vec::new(),
                        other => return err(format!("range over {other}")),
                    };
                    if items.is_empty() {
                        self.exec(otherwise, dot, root, out, depth)?;
                    }
                    for item in &items {
                        self.exec(body, item, root, out, depth)?;
                    }
                }
                Node::Template(name, p) => {
                    let v = self.pipe(p, dot, root, depth)?;
                    out.push_str(&self.include(name, &v, depth)?);
                }
            }
        }
        Ok(())
    }

    fn include(&self, name: &str, dot: &Value, depth: usize) -> Result<String> {
        if depth > 50 {
            return err(format!("template {name:?}: recursion too deep"));
        }
        let body = self
            .defines
            .get(name)
            .ok_or_else(|| Error(format!("no template {name:?} is defined")))?;
        let mut out = String::new();
        // `$` inside a named template is the data it was called with.
        self.exec(body, dot, dot, &mut out, depth + 1)?;
        Ok(out)
    }

    fn pipe(&self, p: &Pipeline, dot: &Value, root: &Value, depth: usize) -> Result<Value> {
        let mut piped: Option<Value> = None;
        for cmd in p {
            piped = Some(self.cmd(cmd, piped, dot, root, depth)?);
        }
        Ok(piped.unwrap_or(Value::Null))
    }

    fn arg(&self, a: &Arg, dot: &Value, root: &Value, depth: usize) -> Result<Value> {
        Ok(match a {
            Arg::Dot => dot.clone(),
            Arg::Field(path) => lookup(dot, path)?,
            Arg::Root(path) => lookup(root, path)?,
            Arg::Str(s) => Value::String(s.clone()),
            Arg::Int(n) => Value::from(*n),
            Arg::Bool(b) => Value::Bool(*b),
            Arg::Sub(p) => self.pipe(p, dot, root, depth)?,
            Arg::Func(f) => self.call(f, Vec::new(), depth)?,
        })
    }

    fn cmd(
        &self,
        cmd: &Cmd,
        piped: Option<Value>,
        dot: &Value,
        root: &Value,
        depth: usize,
    ) -> Result<Value> {
        match &cmd.0[0] {
            Arg::Func(f) => {
                let mut args = Vec::new();
                for a in &cmd.0[1..] {
                    args.push(self.arg(a, dot, root, depth)?);
                }
                args.extend(piped);
                self.call(f, args, depth)
            }
            a => self.arg(a, dot, root, depth),
        }
    }

    fn call(&self, f: &str, args: Vec<Value>, depth: usize) -> Result<Value> {
        let arity = |n: usize| -> Result<()> {
            if args.len() == n {
                Ok(())
            } else {
                err(format!("{f} takes {n} arguments, got {}", args.len()))
            }
        };
        Ok(match f {
            "include" => {
                arity(2)?;
                let name = args[0]
                    .as_str()
                    .ok_or_else(|| Error("include: name must be a string".into()))?;
                Value::String(self.include(name, &args[1], depth)?)
            }
            "toYaml" => {
                arity(1)?;
                let y = serde_yaml::to_string(&args[0]).map_err(|e| Error(e.to_string()))?;
                Value::String(y.trim_end_matches('\n').to_string())
            }
            "nindent" | "indent" => {
                arity(2)?;
                let n = args[0]
                    .as_u64()
                    .ok_or_else(|| Error(format!("{f}: width must be a number")))?;
                let pad = " ".repeat(n as usize);
                let s = printable(&args[1])?;
                let body = format!("{pad}{}", s.replace('\n', &format!("\n{pad}")));
                Value::String(if f == "nindent" {
                    format!("\n{body}")
                } else {
                    body
                })
            }
            "quote" => {
                let mut parts = Vec::new();
                for a in args.iter().filter(|a| !a.is_null()) {
                    parts.push(serde_json::to_string(&printable(a)?).unwrap());
                }
                Value::String(parts.join(" "))
            }
            "default" => {
                if args.is_empty() || args.len() > 2 {
                    return err("default takes 1 or 2 arguments");
                }
                match args.get(1) {
                    Some(v) if truthy(v) => v.clone(),
                    _ => args[0].clone(),
                }
            }
            "required" => {
                arity(2)?;
                if !truthy(&args[1]) {
                    return err(format!(
                        "required: {}",
                        args[0].as_str().unwrap_or("value missing")
                    ));
                }
                args[1].clone()
            }
            "printf" => {
                let fmt = args
                    .first()
                    .and_then(Value::as_str)
                    .ok_or_else(|| Error("printf needs a format string".into()))?;
                Value::String(printf(fmt, &args[1..])?)
            }
            "trimSuffix" => {
                arity(2)?;
                let s = printable(&args[1])?;
                let suffix = printable(&args[0])?;
                Value::String(s.strip_suffix(suffix.as_str()).unwrap_or(&s).to_string())
            }
            "eq" | "ne" => {
                arity(2)?;
                Value::Bool((args[0] == args[1]) == (f == "eq"))
            }
            "not" => {
                arity(1)?;
                Value::Bool(!truthy(&args[0]))
            }
            "and" | "or" => {
                if args.len() < 2 {
                    return err(format!("{f} takes at least 2 arguments"));
                }
                let want = f == "or";
                args.iter()
                    .find(|a| truthy(a) == want)
                    .unwrap_or(args.last().unwrap())
                    .clone()
            }
            other => return err(format!("unsupported function {other}")),
        })
    }
}

fn lookup(v: &Value, path: &[String]) -> Result<Value> {
    let mut cur = v.clone();
    for (i, key) in path.iter().enumerate() {
        cur = match &cur {
            // A missing key is nil, as with Go maps.
            Value::Object(o) => o.get(key).cloned().unwrap_or(Value::Null),
            Value::Null => return err(format!("nil pointer evaluating .{}", path[..=i].join("."))),
            other => {
                return err(format!(
                    ".{}: {other} has no field {key}",
                    path[..i].join(".")
                ))
            }
        };
    }
    Ok(cur)
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn printable(v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => err("a missing value would render as <no value> (wrong values path?)"),
        other => err(format!("printing {other} needs toYaml")),
    }
}

fn printf(fmt: &str, args: &[Value]) -> Result<String> {
    let mut out = String::new();
    let mut args = args.iter();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('s' | 'd' | 'v') => {
                let a = args
                    .next()
                    .ok_or_else(|| Error(format!("printf {fmt:?}: too few arguments")))?;
                out.push_str(&printable(a)?);
            }
            other => return err(format!("printf: verb %{other:?} is not supported")),
        }
    }
    if args.next().is_some() {
        return err(format!("printf {fmt:?}: too many arguments"));
    }
    Ok(out)
}
