//! A small XML writer: elements with attributes and escaped text, indented
//! two spaces, as libvirt writes its own documents. Enough for the domain
//! documents we generate; it reads nothing.

/// Escapes `&`, `<`, `>`, `'`, `"` and the whitespace controls, so any
/// text without other control characters is safe in content and in single-
/// or double-quoted attributes (callers refuse the other controls).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            // A parser turns these into spaces inside attributes.
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

/// An XML document being written, element by element.
#[derive(Default)]
pub struct Writer {
    out: String,
    open: Vec<String>,
}

impl Writer {
    fn indent(&mut self) {
        for _ in 0..self.open.len() {
            self.out.push_str("  ");
        }
    }

    fn start(&mut self, tag: &str, attrs: &[(&str, &str)]) {
        self.indent();
        self.out.push('<');
        self.out.push_str(tag);
        for (k, v) in attrs {
            self.out.push_str(&format!(" {k}='{}'", escape(v)));
        }
    }

    /// `<tag a='v'>`, then what follows inside it until `close`.
    pub fn open(&mut self, tag: &str, attrs: &[(&str, &str)]) -> &mut Self {
        self.start(tag, attrs);
        self.out.push_str(">\n");
        self.open.push(tag.to_string());
        self
    }

    /// Closes the innermost open element.
    pub fn close(&mut self) -> &mut Self {
        if let Some(tag) = self.open.pop() {
            self.indent();
            self.out.push_str(&format!("</{tag}>\n"));
        }
        self
    }

    /// `<tag a='v'/>`.
    pub fn empty(&mut self, tag: &str, attrs: &[(&str, &str)]) -> &mut Self {
        self.start(tag, attrs);
        self.out.push_str("/>\n");
        self
    }

    /// `<tag a='v'>text</tag>`.
    pub fn text(&mut self, tag: &str, attrs: &[(&str, &str)], text: &str) -> &mut Self {
        self.start(tag, attrs);
        self.out.push_str(&format!(">{}</{tag}>\n", escape(text)));
        self
    }

    /// The document, every element closed.
    pub fn finish(mut self) -> String {
        while !self.open.is_empty() {
            self.close();
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_attributes_are_escaped_and_elements_nest() {
        let mut w = Writer::default();
        w.open("a", &[("x", "it's <1> & \"2\"")])
            .text("b", &[], "</b><c>")
            .empty("d", &[("k", "v")]);
        assert_eq!(
            w.finish(),
            "<a x='it&apos;s &lt;1&gt; &amp; &quot;2&quot;'>\n  <b>&lt;/b&gt;&lt;c&gt;</b>\n  <d k='v'/>\n</a>\n"
        );
    }
}
