//! The API keys file (`[auth] keys_file`): one key a line.
//!
//! ```text
//! # NAME   KEY                 [ATTRIBUTE=VALUE ...]
//! alice    sk-alice-7Hq2...    models=llama-3-8b,qwen2 rps=10 prompt_bytes_per_s=200000
//! ci-bot   sk-ci-Vb81...       # no attributes: any model, no rate limit
//! ```
//!
//! - Fields are separated by spaces or tabs. A field that starts with `#`
//!   starts a comment to the end of the line; blank lines are ignored.
//! - `NAME`: 1 to 64 of `A-Z a-z 0-9 _ . -`, unique in the file. It is what
//!   logs and metrics (the `key` label) show of a key, and the prediction
//!   cache's tenant.
//! - `KEY`: 8 to 256 printable ASCII bytes, no whitespace, not starting with
//!   `#`; unique in the file. Only its SHA-256 digest is kept once read.
//! - Attributes, each at most once:
//!   - `models=M1,M2,...`: the only models (the body's `"model"`, compared as
//!     written in the JSON) the key may use. Absent: any model.
//!   - `rps=N`: requests per second (a positive number, fractions allowed).
//!   - `prompt_bytes_per_s=N`: prompt bytes per second (a positive integer).
//!
//! A malformed line is reported as `FILE:LINE: why`, naming the field by its
//! position: never its text, which could be (part of) a key (even the name: a
//! line written key first has the key there).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// SHA-256 of a key: the only form a key is kept in.
pub type KeyDigest = [u8; 32];

pub const MAX_NAME: usize = 64;
pub const MIN_KEY: usize = 8;
pub const MAX_KEY: usize = 256;
/// Far above any real limit; keeps the bucket arithmetic away from overflow.
const MAX_RATE: f64 = 1e12;

/// One line of the keys file, the key already hashed.
#[derive(Clone, PartialEq)]
pub struct KeySpec {
    pub name: String,
    pub digest: KeyDigest,
    /// `None`: any model.
    pub models: Option<Vec<String>>,
    pub rps: Option<f64>,
    pub prompt_bytes_per_s: Option<f64>,
}

impl std::fmt::Debug for KeySpec {
    // The digest is left out too: it is as good as the key to a brute-force search.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySpec")
            .field("name", &self.name)
            .field("models", &self.models)
            .field("rps", &self.rps)
            .field("prompt_bytes_per_s", &self.prompt_bytes_per_s)
            .finish_non_exhaustive()
    }
}

/// Why a keys file is refused: the file and line, then why.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: {why}")]
    Line {
        file: String,
        line: usize,
        #[source]
        why: LineError,
    },
}

/// What is wrong with one line. A field is named by its position, never by its
/// text, which could be (part of) a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("not UTF-8")]
    NotUtf8,
    #[error("the name is already used on line {0}")]
    NameUsed(usize),
    #[error("the key is the same as that on line {0}")]
    KeyUsed(usize),
    #[error("field 1 (the name) must be 1 to {MAX_NAME} of A-Z a-z 0-9 _ . -")]
    Name,
    #[error("no key: expected NAME KEY [ATTRIBUTE=VALUE ...]")]
    NoKey,
    #[error("field 2 (the key) must be {MIN_KEY} to {MAX_KEY} printable ASCII characters")]
    Key,
    #[error("field {0} is not ATTRIBUTE=VALUE (a key must not contain spaces)")]
    NotAttribute(usize),
    #[error("{attr} (field {field}) is given twice")]
    Twice { attr: &'static str, field: usize },
    #[error("models (field {0}) must be a comma-separated list of model names")]
    Models(usize),
    #[error("rps (field {0}) must be a positive number of requests per second")]
    Rps(usize),
    #[error("prompt_bytes_per_s (field {0}) must be a positive integer")]
    PromptBytes(usize),
    #[error("field {0} is not a known attribute (models, rps, prompt_bytes_per_s)")]
    UnknownAttribute(usize),
}

pub fn digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// Reads and parses the file at `path`; errors name the file (and line).
pub fn load(path: &Path) -> Result<Vec<KeySpec>, KeysFileError> {
    let text = std::fs::read(path).map_err(|source| KeysFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses a whole keys file; `file` names it in errors.
pub fn parse(text: &[u8], file: &str) -> Result<Vec<KeySpec>, KeysFileError> {
    let mut out: Vec<(usize, KeySpec)> = Vec::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let at = |why: LineError| KeysFileError::Line {
            file: file.to_owned(),
            line: line_no,
            why,
        };
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let Ok(line) = std::str::from_utf8(raw) else {
            return Err(at(LineError::NotUtf8));
        };
        let Some(spec) = parse_line(line).map_err(at)? else {
            continue;
        };
        for (prev_line, prev) in &out {
            if prev.name == spec.name {
                return Err(at(LineError::NameUsed(*prev_line)));
            }
            if prev.digest == spec.digest {
                return Err(at(LineError::KeyUsed(*prev_line)));
            }
        }
        out.push((line_no, spec));
    }
    Ok(out.into_iter().map(|(_, s)| s).collect())
}

/// One line: `Ok(None)` for a blank or comment line.
fn parse_line(line: &str) -> Result<Option<KeySpec>, LineError> {
    let mut fields = line
        .split([' ', '\t'])
        .filter(|f| !f.is_empty())
        .take_while(|f| !f.starts_with('#'));
    let Some(name) = fields.next() else {
        return Ok(None);
    };
    if name.len() > MAX_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(LineError::Name);
    }
    let Some(key) = fields.next() else {
        return Err(LineError::NoKey);
    };
    if !(MIN_KEY..=MAX_KEY).contains(&key.len()) || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(LineError::Key);
    }
    let mut spec = KeySpec {
        name: name.to_owned(),
        digest: digest(key.as_bytes()),
        models: None,
        rps: None,
        prompt_bytes_per_s: None,
    };
    for (i, field) in fields.enumerate() {
        let n = i + 3;
        let Some((attr, value)) = field.split_once('=') else {
            return Err(LineError::NotAttribute(n));
        };
        let twice = |name: &'static str| LineError::Twice {
            attr: name,
            field: n,
        };
        match attr {
            "models" => {
                if spec.models.is_some() {
                    return Err(twice("models"));
                }
                let list: Vec<String> = value.split(',').map(str::to_owned).collect();
                if list.iter().any(String::is_empty) {
                    return Err(LineError::Models(n));
                }
                spec.models = Some(list);
            }
            "rps" => {
                if spec.rps.is_some() {
                    return Err(twice("rps"));
                }
                spec.rps = Some(rate(value).ok_or(LineError::Rps(n))?);
            }
            "prompt_bytes_per_s" => {
                if spec.prompt_bytes_per_s.is_some() {
                    return Err(twice("prompt_bytes_per_s"));
                }
                let v = value
                    .parse::<u64>()
                    .ok()
                    .map(|v| v as f64)
                    .filter(|v| *v > 0.0 && *v <= MAX_RATE);
                spec.prompt_bytes_per_s = Some(v.ok_or(LineError::PromptBytes(n))?);
            }
            _ => return Err(LineError::UnknownAttribute(n)),
        }
    }
    Ok(Some(spec))
}

fn rate(v: &str) -> Option<f64> {
    v.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0 && *r <= MAX_RATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Vec<KeySpec> {
        parse(text.as_bytes(), "keys").unwrap_or_else(|e| panic!("{e}"))
    }

    /// The error for `text`, checked not to contain `secret`.
    fn err(text: &str, secret: &str) -> String {
        let e = parse(text.as_bytes(), "keys")
            .expect_err("should be refused")
            .to_string();
        assert!(!e.contains(secret), "error echoes the key: {e}");
        e
    }

    #[test]
    fn comments_blank_lines_and_attributes() {
        let specs = ok("# the team's keys\n\
             \n\
             alice sk-alice-0001 models=llama-3-8b,qwen2 rps=10 prompt_bytes_per_s=200000\r\n\
             \t  bob\tsk-bob-000002   # no limits\n\
             carol sk-carol-0003 rps=0.5 #models=x\n\
             dave sk-da#ve-0004\n");
        assert_eq!(specs.len(), 4);
        let a = &specs[0];
        assert_eq!(a.name, "alice");
        assert_eq!(a.digest, digest(b"sk-alice-0001"));
        assert_eq!(
            a.models.as_deref(),
            Some(&["llama-3-8b".to_string(), "qwen2".to_string()][..])
        );
        assert_eq!((a.rps, a.prompt_bytes_per_s), (Some(10.0), Some(200000.0)));
        let b = &specs[1];
        assert_eq!(
            (b.name.as_str(), b.models.as_ref(), b.rps),
            ("bob", None, None)
        );
        assert_eq!(b.digest, digest(b"sk-bob-000002"));
        assert_eq!((specs[2].rps, specs[2].models.as_ref()), (Some(0.5), None));
        // `#` inside a field is part of it.
        assert_eq!(specs[3].digest, digest(b"sk-da#ve-0004"));
        assert!(ok("").is_empty());
        assert!(ok("   \n# only comments\n\n").is_empty());
    }

    #[test]
    fn names_and_keys_must_be_unique() {
        let e = err(
            "a sk-one-00001\nb sk-two-00002\na sk-three-0003\n",
            "sk-three",
        );
        assert!(e.starts_with("keys:3: ") && e.contains("line 1"), "{e}");
        let e = err("a sk-same-0001\nb sk-same-0001\n", "sk-same");
        assert!(e.starts_with("keys:2: ") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn malformed_lines_name_the_line_never_the_key() {
        let key = "sk-secret-9f8e7d";
        for (text, want) in [
            (format!("alice {key} rps=0\n"), "rps"),
            (format!("alice {key} rps=fast\n"), "rps"),
            (format!("alice {key} rps=inf\n"), "rps"),
            (format!("alice {key} rps=1 rps=2\n"), "twice"),
            (format!("alice {key} prompt_bytes_per_s=1.5\n"), "integer"),
            (format!("alice {key} models=\n"), "models"),
            (format!("alice {key} models=a,,b\n"), "models"),
            (format!("alice {key} rsp=10\n"), "field 3"),
            // A key with a space in it: its second half must not be echoed either.
            (format!("alice {key} {key}\n"), "field 3"),
            (format!("{key}\n"), "no key"),
            (format!("{key}/x alice\n"), "field 1"),
            (format!("alice {key}\u{e9}\n"), "printable"),
            ("alice short\n".to_string(), "8 to 256"),
        ] {
            let e = err(&format!("# header\n{text}"), key);
            assert!(e.starts_with("keys:2: "), "{e}");
            assert!(e.contains(want), "{e} lacks {want:?}");
        }
        // A name with the key's characters allowed is still refused without it.
        let e = err(
            &format!("{} sk-x-000000\n", "n".repeat(65)),
            "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn",
        );
        assert!(e.contains("field 1"), "{e}");
        let e = parse(b"a sk-0000000\xff\n", "k").unwrap_err();
        assert_eq!(e.to_string(), "k:1: not UTF-8");
        assert!(matches!(
            e,
            KeysFileError::Line {
                line: 1,
                why: LineError::NotUtf8,
                ..
            }
        ));
    }

    /// The shipped example is the documentation of the syntax: it must parse.
    #[test]
    fn shipped_example_parses() {
        let specs = ok(include_str!("../../../deploy/keys.example"));
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["alice", "batch-job", "ci"]);
        assert_eq!(specs[1].rps, Some(0.5));
        assert_eq!(specs[0].prompt_bytes_per_s, Some(200000.0));
    }

    #[test]
    fn debug_shows_no_key_material() {
        let s = &ok("alice sk-alice-0001 rps=1\n")[0];
        let shown = format!("{s:?}");
        assert!(
            shown.contains("alice") && !shown.contains("digest"),
            "{shown}"
        );
    }
}
