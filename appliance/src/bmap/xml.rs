//! A small, strict XML reader for block map files: the XML that bmaptool
//! writes and reads (elements, attributes, text, comments, processing
//! instructions, CDATA, the five predefined entities and character
//! references) and nothing that expands: a DOCTYPE (and with it any entity
//! definition) is refused. Errors name the line; nothing here panics on
//! any input.

use anyhow::{anyhow, bail, Result};

/// Deepest element nesting accepted (a block map needs 3).
pub const MAX_DEPTH: usize = 32;

/// One element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    /// The text directly inside (not the children's), entities resolved.
    pub text: String,
    /// Line of the start tag, for messages.
    pub line: usize,
}

impl Element {
    /// The value of attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The direct children called `name`, in document order.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }
}

/// Parses a whole document (UTF-8, an optional byte order mark) into its
/// root element.
pub fn parse(input: &[u8]) -> Result<Element> {
    let s = std::str::from_utf8(input).map_err(|e| {
        anyhow!(
            "not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    let s = s.strip_prefix('\u{feff}').unwrap_or(s);
    let mut p = Parser {
        s,
        pos: 0,
        counted: std::cell::Cell::new((0, 1)),
    };
    p.misc()?;
    if !p.rest().starts_with('<') {
        return Err(p.err("expected the root element"));
    }
    let root = p.element(0)?;
    p.misc()?;
    if p.pos < s.len() {
        return Err(p.err("content after the root element"));
    }
    Ok(root)
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
    /// `(offset, line there)`: lines are counted on from the last place
    /// asked about, so numbering every element stays linear.
    counted: std::cell::Cell<(usize, usize)>,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn line_at(&self, pos: usize) -> usize {
        let pos = pos.min(self.s.len());
        let (mut from, mut line) = self.counted.get();
        if pos < from {
            (from, line) = (0, 1);
        }
        line += self.s.as_bytes()[from..pos]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.counted.set((pos, line));
        line
    }

    fn err(&self, what: &str) -> anyhow::Error {
        anyhow!("XML line {}: {what}", self.line_at(self.pos))
    }

    fn skip_ws(&mut self) {
        let r = self.rest();
        self.pos += r.len() - r.trim_start_matches([' ', '\t', '\r', '\n']).len();
    }

    /// Moves past `end`, which must follow; `what` names the construct.
    fn past(&mut self, end: &str, what: &str) -> Result<&'a str> {
        let start = self.pos;
        match self.rest().find(end) {
            Some(i) => {
                self.pos += i + end.len();
                Ok(&self.s[start..start + i])
            }
            None => Err(anyhow!(
                "XML line {}: unterminated {what}",
                self.line_at(start)
            )),
        }
    }

    /// Whitespace, comments and processing instructions (outside the root).
    fn misc(&mut self) -> Result<()> {
        loop {
            self.skip_ws();
            if !self.markup()? {
                return Ok(());
            }
        }
    }

    /// A comment or processing instruction at the cursor, skipped; false
    /// when there is none. Declarations (DOCTYPE) are refused.
    fn markup(&mut self) -> Result<bool> {
        let r = self.rest();
        if r.starts_with("<!--") {
            self.pos += 4;
            self.past("-->", "comment")?;
        } else if r.starts_with("<?") {
            self.pos += 2;
            self.past("?>", "processing instruction")?;
        } else if r.starts_with("<!") && !r.starts_with("<![CDATA[") {
            return Err(self.err("DOCTYPE and other declarations are not accepted"));
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    fn name(&mut self) -> Result<String> {
        let r = self.rest();
        let n = r
            .find(|c: char| c.is_whitespace() || "/>=<\"'&".contains(c))
            .unwrap_or(r.len());
        if n == 0 {
            return Err(self.err("expected a name"));
        }
        self.pos += n;
        Ok(r[..n].to_owned())
    }

    fn expect(&mut self, c: char) -> Result<()> {
        if self.rest().starts_with(c) {
            self.pos += c.len_utf8();
            Ok(())
        } else {
            Err(self.err(&format!("expected {c:?}")))
        }
    }

    /// The element starting at the cursor (`<`).
    fn element(&mut self, depth: usize) -> Result<Element> {
        if depth >= MAX_DEPTH {
            return Err(self.err(&format!("elements nested deeper than {MAX_DEPTH}")));
        }
        let line = self.line_at(self.pos);
        self.expect('<')?;
        let name = self.name()?;
        let mut el = Element {
            name,
            attrs: Vec::new(),
            children: Vec::new(),
            text: String::new(),
            line,
        };
        loop {
            let had_ws = {
                let before = self.pos;
                self.skip_ws();
                self.pos > before
            };
            let r = self.rest();
            if r.starts_with("/>") {
                self.pos += 2;
                return Ok(el);
            }
            if r.starts_with('>') {
                self.pos += 1;
                break;
            }
            if !had_ws {
                return Err(self.err(&format!("malformed start tag <{}>", el.name)));
            }
            let an = self.name()?;
            self.skip_ws();
            self.expect('=')?;
            self.skip_ws();
            let q = match self.rest().chars().next() {
                Some(q @ ('"' | '\'')) => q,
                _ => return Err(self.err(&format!("attribute {an} has no quoted value"))),
            };
            self.pos += 1;
            let raw = self.past(if q == '"' { "\"" } else { "'" }, "attribute value")?;
            if raw.contains('<') {
                return Err(self.err(&format!("attribute {an} contains '<'")));
            }
            let v = unescape(raw).map_err(|e| self.err(&e.to_string()))?;
            if el.attr(&an).is_some() {
                return Err(self.err(&format!("attribute {an} given twice")));
            }
            el.attrs.push((an, v));
        }
        loop {
            let r = self.rest();
            if r.is_empty() {
                bail!("XML: <{}> opened on line {line} is never closed", el.name);
            }
            if r.starts_with("</") {
                self.pos += 2;
                let end = self.name()?;
                self.skip_ws();
                self.expect('>')?;
                if end != el.name {
                    return Err(self.err(&format!(
                        "</{end}> closes <{}> (opened on line {line})",
                        el.name
                    )));
                }
                return Ok(el);
            }
            if r.starts_with("<![CDATA[") {
                self.pos += 9;
                let t = self.past("]]>", "CDATA section")?;
                el.text.push_str(t);
            } else if self.markup()? {
            } else if r.starts_with('<') {
                let child = self.element(depth + 1)?;
                el.children.push(child);
            } else {
                let n = r.find('<').unwrap_or(r.len());
                let t = unescape(&r[..n]).map_err(|e| self.err(&e.to_string()))?;
                self.pos += n;
                el.text.push_str(&t);
            }
        }
    }
}

/// Resolves the predefined entities and character references.
fn unescape(raw: &str) -> Result<String> {
    if !raw.contains('&') {
        return Ok(raw.to_owned());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        let end = rest
            .find(';')
            .filter(|&e| e <= 32)
            .ok_or_else(|| anyhow!("a bare '&' (not an entity reference)"))?;
        let ent = &rest[..end];
        let c = match ent {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(h) = ent.strip_prefix("#x") {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = ent.strip_prefix('#') {
                    d.parse::<u32>().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .filter(|&c| c != '\0')
                    .ok_or_else(|| anyhow!("unknown entity &{ent};"))?
            }
        };
        out.push(c);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_elements_attributes_text_and_skips_comments() {
        let doc = "\u{feff}<?xml version=\"1.0\" ?>\n<!-- c -->\n<a x='1' y=\"&lt;2&gt;\">\n \
                   <b>t&amp;u<!-- in --> v</b><c/><b k=\"&#x41;&#66;\"><![CDATA[<raw>]]></b>\n</a>\n<!-- end -->\n";
        let a = parse(doc.as_bytes()).unwrap();
        assert_eq!(a.name, "a");
        assert_eq!(a.attr("x"), Some("1"));
        assert_eq!(a.attr("y"), Some("<2>"));
        let bs: Vec<_> = a.children_named("b").collect();
        assert_eq!(bs.len(), 2);
        assert_eq!(bs[0].text, "t&u v");
        assert_eq!(bs[1].attr("k"), Some("AB"));
        assert_eq!(bs[1].text, "<raw>");
        assert_eq!(bs[1].line, 4);
        assert_eq!(a.children.len(), 3);
    }

    #[test]
    fn refuses_malformed_and_hostile_documents() {
        let deep = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        let cases: &[(&[u8], &str)] = &[
            (b"", "root element"),
            (b"<a>", "never closed"),
            (b"<a></b>", "closes <a>"),
            (b"<a x=1></a>", "quoted"),
            (b"<a x='1' x='2'></a>", "twice"),
            (b"<a>&foo;</a>", "unknown entity"),
            (b"<a>& b</a>", "bare"),
            (b"<a>&#0;</a>", "unknown entity"),
            (b"<a>&#xFFFFFFFFF;</a>", "unknown entity"),
            (b"<!DOCTYPE a [<!ENTITY e \"x\">]><a>&e;</a>", "DOCTYPE"),
            (b"<a><!-- open</a>", "unterminated comment"),
            (b"<a></a><b></b>", "after the root"),
            (b"<a>\xff</a>", "UTF-8"),
            (b"<a x='1'y='2'></a>", "malformed"),
            (deep.as_bytes(), "deeper"),
        ];
        for (doc, want) in cases {
            let e = format!("{:#}", parse(doc).unwrap_err());
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(doc));
        }
    }
}
