//! `${VAR}` references in the config text, replaced before the TOML is parsed.
//!
//! Secrets and per-host values (broker password, listen address, MN prefix) come
//! from the service's environment (`Environment=`, `EnvironmentFile=`, a
//! container's `-e`) the way Vector and Telegraf operators expect, so one file
//! serves every host and holds no password. Values go in as raw text, before
//! parsing: `password = "${MQTT_PW}"` makes a string, `port = ${PORT}` a number.
//!
//! Syntax: `${NAME}` (an unset variable is an error, naming it and its line),
//! `${NAME:-default}` (the default when unset or empty), `$$` (a literal `$`).
//! A `$` followed by anything else stays as it is. References in comments are
//! left alone, so a commented-out line never needs its variable.

use std::borrow::Cow;
use std::ffi::OsString;

/// A reference that cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvError {
    /// 1-based line of the reference in the config text.
    pub line: usize,
    /// What is wrong (names the variable, never its value).
    pub message: String,
}

/// Where the lexer is: expansion happens everywhere but in comments, and a `#`
/// only starts a comment outside strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Normal,
    Comment,
    /// `"..."`: backslash escapes, one line.
    Basic,
    /// `'...'`: no escapes, one line.
    Literal,
    /// `"""..."""`.
    MultiBasic,
    /// `'''...'''`.
    MultiLiteral,
}

/// `text` with every reference replaced, looking variables up with `lookup`;
/// borrowed when there is nothing to replace.
pub fn expand(
    text: &str,
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<Cow<'_, str>, EnvError> {
    if !text.contains('$') {
        return Ok(Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut state = State::Normal;
    let mut line = 1;
    // Start of the text not yet copied to `out`.
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let rest = &bytes[i..];
        match (state, b) {
            (_, b'\n') => {
                line += 1;
                // Single-line strings cannot span lines; TOML reports that itself.
                if matches!(state, State::Comment | State::Basic | State::Literal) {
                    state = State::Normal;
                }
            }
            (State::Comment, _) => {}
            (State::Normal, b'#') => state = State::Comment,
            (State::Normal, b'"') if rest.starts_with(b"\"\"\"") => {
                state = State::MultiBasic;
                i += 3;
                continue;
            }
            (State::Normal, b'\'') if rest.starts_with(b"'''") => {
                state = State::MultiLiteral;
                i += 3;
                continue;
            }
            (State::Normal, b'"') => state = State::Basic,
            (State::Normal, b'\'') => state = State::Literal,
            (State::Basic | State::MultiBasic, b'\\') => {
                // The escaped character cannot end the string (`\"`); an escaped
                // line break still counts as a line.
                if bytes.get(i + 1) == Some(&b'\n') {
                    line += 1;
                }
                i += 2;
                continue;
            }
            (State::Basic, b'"') | (State::Literal, b'\'') => state = State::Normal,
            (State::MultiBasic, b'"') if rest.starts_with(b"\"\"\"") => {
                state = State::Normal;
                i += 3;
                continue;
            }
            (State::MultiLiteral, b'\'') if rest.starts_with(b"'''") => {
                state = State::Normal;
                i += 3;
                continue;
            }
            (_, b'$') => {
                if let Some((len, value)) = reference(&text[i..], line, &lookup)? {
                    out.push_str(&text[copied..i]);
                    out.push_str(&value);
                    i += len;
                    copied = i;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if copied == 0 {
        return Ok(Cow::Borrowed(text));
    }
    out.push_str(&text[copied..]);
    Ok(Cow::Owned(out))
}

/// The reference at the start of `s` (which starts with `$`): its length and
/// its value, or `None` when it is not one (a lone `$`).
fn reference(
    s: &str,
    line: usize,
    lookup: &impl Fn(&str) -> Option<OsString>,
) -> Result<Option<(usize, String)>, EnvError> {
    if s.starts_with("$$") {
        return Ok(Some((2, "$".to_owned())));
    }
    if !s.starts_with("${") {
        return Ok(None);
    }
    let err = |message: String| EnvError { line, message };
    let body_end = s[2..].find(['}', '\n']).map(|n| n + 2);
    let Some(end) = body_end.filter(|&e| s.as_bytes()[e] == b'}') else {
        return Err(err(format!(
            "`{}` is not closed: expected `${{NAME}}` or `${{NAME:-default}}` on one line (write `$$` for a literal `$`)",
            s.lines().next().unwrap_or(s)
        )));
    };
    let body = &s[2..end];
    let (name, default) = match body.split_once(":-") {
        Some((n, d)) => (n, Some(d)),
        None => (body, None),
    };
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(err(format!(
            "`${{{body}}}` is not a valid reference: the name must be letters, digits and `_`, not starting with a digit (write `$$` for a literal `$`)"
        )));
    }
    let value = match lookup(name) {
        Some(v) => Some(
            v.into_string()
                .map_err(|_| err(format!("environment variable `{name}` is not valid UTF-8")))?,
        ),
        None => None,
    };
    let value = match (value, default) {
        (Some(v), Some(d)) if v.is_empty() => d.to_owned(),
        (Some(v), _) => v,
        (None, Some(d)) => d.to_owned(),
        (None, None) => {
            return Err(err(format!(
                "environment variable `{name}` is not set (referenced as `${{{name}}}`; give a default with `${{{name}:-value}}`)"
            )));
        }
    };
    // A line break would shift every later line, so TOML's messages would point
    // at the wrong line; nothing in the config needs a multi-line value.
    if value.contains(['\n', '\r']) {
        return Err(err(format!(
            "environment variable `{name}` holds a line break; values are inserted into the TOML text as they are and must stay on one line"
        )));
    }
    Ok(Some((end + 1, value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    fn ok(text: &str, vars: &[(&str, &str)]) -> String {
        expand(text, env(vars))
            .unwrap_or_else(|e| panic!("{text}: {e:?}"))
            .into_owned()
    }

    fn err(text: &str, vars: &[(&str, &str)]) -> EnvError {
        expand(text, env(vars)).expect_err(text)
    }

    #[test]
    fn references_are_replaced_by_raw_text() {
        let vars = [("PW", "s3cret"), ("PORT", "1883"), ("EMPTY", "")];
        assert_eq!(
            ok("password = \"${PW}\"\nport = ${PORT}\n", &vars),
            "password = \"s3cret\"\nport = 1883\n"
        );
        assert_eq!(ok("a = '${PW}'", &vars), "a = 's3cret'");
        assert_eq!(
            ok("a = \"\"\"\nx${PW}\n\"\"\"", &vars),
            "a = \"\"\"\nxs3cret\n\"\"\""
        );
        assert_eq!(ok("a = '''${PW}'''", &vars), "a = '''s3cret'''");
        assert_eq!(ok("a = \"${PW}${PORT}\"", &vars), "a = \"s3cret1883\"");
        // Nothing to do: the text itself comes back.
        assert!(matches!(
            expand("a = 1", env(&[])),
            Ok(Cow::Borrowed("a = 1"))
        ));
        assert!(matches!(
            expand("a = \"$x\"", env(&[])),
            Ok(Cow::Borrowed("a = \"$x\""))
        ));
    }

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        let vars = [("SET", "v"), ("EMPTY", "")];
        assert_eq!(ok("${SET:-d}", &vars), "v");
        assert_eq!(ok("${EMPTY:-d}", &vars), "d");
        assert_eq!(ok("${UNSET:-d}", &vars), "d");
        assert_eq!(ok("${UNSET:-}", &vars), "");
        assert_eq!(
            ok("${UNSET:-tcp://h:1883/x?a=b}", &vars),
            "tcp://h:1883/x?a=b"
        );
        // Set but empty without a default is empty, not an error.
        assert_eq!(ok("x${EMPTY}y", &vars), "xy");
    }

    #[test]
    fn dollars_escape_and_lone_dollars_stay() {
        let vars = [("V", "1")];
        assert_eq!(ok("pw = \"a$$b\"", &vars), "pw = \"a$b\"");
        assert_eq!(ok("pw = \"$${V}\"", &vars), "pw = \"${V}\"");
        assert_eq!(ok("pw = \"a$b$\"", &vars), "pw = \"a$b$\"");
        assert_eq!(ok("pw = \"$$$${V}$$${V}\"", &vars), "pw = \"$${V}$1\"");
    }

    #[test]
    fn comments_are_not_expanded() {
        let text =
            "# password = \"${MQTT_PW}\"\na = 1 # ${ALSO_UNSET}\nb = \"#${V}\"\nc = '#' # ${X\n";
        assert_eq!(
            ok(text, &[("V", "v")]),
            "# password = \"${MQTT_PW}\"\na = 1 # ${ALSO_UNSET}\nb = \"#v\"\nc = '#' # ${X\n"
        );
        // An escaped quote does not end the string, so the `#` after it is no comment.
        assert_eq!(ok(r##"a = "\"#${V}""##, &[("V", "v")]), r##"a = "\"#v""##);
    }

    #[test]
    fn errors_name_the_variable_and_the_line() {
        let e = err("a = 1\n\n[mqtt]\npassword = \"${MQTT_PW}\"\n", &[]);
        assert_eq!(e.line, 4);
        assert!(e.message.contains("`MQTT_PW` is not set"), "{}", e.message);
        assert!(e.message.contains("${MQTT_PW:-value}"), "{}", e.message);
        // Lines in multi-line strings and escaped line breaks count.
        let e = err("a = \"\"\"\none\\\ntwo\n\"\"\"\nb = \"${NOPE}\"", &[]);
        assert_eq!(e.line, 5, "{e:?}");
        for (text, what) in [
            ("a = \"${}\"", "not a valid reference"),
            ("a = \"${1X}\"", "not a valid reference"),
            ("a = \"${A B}\"", "not a valid reference"),
            ("a = \"${A-b}\"", "not a valid reference"),
            ("a = \"${OPEN\"\nb = 1}", "not closed"),
        ] {
            let e = err(text, &[("A", "1")]);
            assert_eq!(e.line, 1, "{text}");
            assert!(e.message.contains(what), "{text}: {}", e.message);
        }
    }

    #[test]
    fn values_never_appear_in_errors_and_never_break_lines() {
        let e = err("a = \"${PW}\"", &[("PW", "top\nsecret")]);
        assert!(
            e.message.contains("`PW` holds a line break"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("secret"), "{}", e.message);
    }
}
