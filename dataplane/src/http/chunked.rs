//! Incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1).
//!
//! Hand-written rather than taken from a crate because the proxy needs two modes
//! of one state machine: decode a request body into a buffer (to hash the prompt
//! and forward it with a Content-Length), and only *track* a response body while
//! its raw bytes stream through unchanged, so the proxy knows where it ends
//! without copying or re-framing it.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    BadSize,
    #[error("chunk size too large")]
    SizeOverflow,
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    #[error("bare LF in chunked framing")]
    BareLf,
    #[error("chunk line too long")]
    LineTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size,
    /// After the size: optional whitespace/extensions up to CRLF.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Trailer section: at the start of a line.
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// Longest chunk-size line (size plus extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    digits: usize,
    line: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes `input`, appending chunk data to `out` when given. Returns how many
    /// bytes of `input` belong to the chunked body (less than `input.len()` only
    /// when the body ended inside it).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut out: Option<&mut Vec<u8>>,
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => return Ok(i),
                State::Data => {
                    let take = (self.size as usize).min(input.len() - i);
                    if let Some(o) = out.as_deref_mut() {
                        o.extend_from_slice(&input[i..i + take]);
                    }
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::Size => match hex(b) {
                    Some(v) => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(ChunkError::SizeOverflow);
                        }
                        self.size = self.size * 16 + v as u64;
                    }
                    None if self.digits == 0 => return Err(ChunkError::BadSize),
                    None => match b {
                        b'\r' => self.state = State::SizeLf,
                        b'\n' => return Err(ChunkError::BareLf),
                        b';' | b' ' | b'\t' => {
                            self.state = State::Ext;
                            self.line = 0;
                        }
                        _ => return Err(ChunkError::BadSize),
                    },
                },
                State::Ext => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError::BareLf),
                    _ => {
                        self.line += 1;
                        if self.line > MAX_LINE {
                            return Err(ChunkError::LineTooLong);
                        }
                    }
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadSize);
                    }
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                    self.digits = 0;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = State::Size;
                    self.size = 0;
                    self.digits = 0;
                }
                State::TrailerStart => match b {
                    b'\r' => self.state = State::FinalLf,
                    b'\n' => return Err(ChunkError::BareLf),
                    _ => {
                        self.state = State::TrailerLine;
                        self.line = 1;
                    }
                },
                State::TrailerLine => match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\n' => return Err(ChunkError::BareLf),
                    _ => {
                        self.line += 1;
                        if self.line > MAX_LINE {
                            return Err(ChunkError::LineTooLong);
                        }
                    }
                },
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BareLf);
                    }
                    self.state = State::TrailerStart;
                }
                State::FinalLf => {
                    if b != b'\n' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = State::Done;
                }
            }
            i += 1;
        }
        Ok(i)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let n = d.feed(input, Some(&mut out))?;
        Ok((out, n, d.is_done()))
    }

    #[test]
    fn decodes_with_extensions_and_trailers() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (out, n, done) = decode_all(body).unwrap();
        assert_eq!(out, b"hello world");
        assert!(done);
        assert_eq!(&body[n..], b"NEXT");
    }

    #[test]
    fn byte_by_byte_equals_whole() {
        let body = b"A\r\n0123456789\r\n1\r\nx\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        for b in body.iter() {
            assert_eq!(d.feed(std::slice::from_ref(b), Some(&mut out)).unwrap(), 1);
        }
        assert!(d.is_done());
        assert_eq!(out, b"0123456789x");
    }

    #[test]
    fn rejects_smuggling_shapes() {
        assert_eq!(decode_all(b"zz\r\n").unwrap_err(), ChunkError::BadSize);
        assert_eq!(decode_all(b"\r\n").unwrap_err(), ChunkError::BadSize);
        assert_eq!(decode_all(b"5\nhello").unwrap_err(), ChunkError::BareLf);
        assert_eq!(
            decode_all(b"5\r\nhelloX").unwrap_err(),
            ChunkError::MissingCrlf
        );
        assert_eq!(
            decode_all(b"fffffffffffffffff\r\n").unwrap_err(),
            ChunkError::SizeOverflow
        );
        assert_eq!(decode_all(b"0\r\n\n").unwrap_err(), ChunkError::BareLf);
        assert_eq!(decode_all(b"-1\r\n").unwrap_err(), ChunkError::BadSize);
    }

    #[test]
    fn tracking_without_output_finds_end() {
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.feed(b"3\r\nabc\r\n", None).unwrap(), 8);
        assert!(!d.is_done());
        assert_eq!(d.feed(b"0\r\n\r\nrest", None).unwrap(), 5);
        assert!(d.is_done());
    }
}
