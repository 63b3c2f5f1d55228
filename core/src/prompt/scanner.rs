//! A validating JSON scanner that never copies: strings come back as the raw bytes
//! between their quotes, any value can be skipped and returned as its raw text.

use wide::u8x16;

use super::ExtractError;

/// Containers deeper than this are rejected rather than walked, so hostile bodies
/// cannot make skipping expensive; real requests nest a handful of levels.
pub const MAX_DEPTH: usize = 128;

/// Bytes the string scan classifies at once (one bit each in a `u64`).
pub(crate) const STRING_CHUNK: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Literal {
    True,
    False,
    Null,
}

pub struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
}

#[inline(always)]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t')
}

/// The bytes that make a whole escape after a backslash; `u` needs four hex
/// digits more, anything else is invalid.
const SIMPLE_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let ok = *b"\"\\/bfnrt";
    let mut k = 0;
    while k < ok.len() {
        t[ok[k] as usize] = true;
        k += 1;
    }
    t
};

/// One 64-byte chunk of a string as bit masks (bit i = byte i).
pub(crate) struct ChunkMasks {
    pub(crate) quote: u64,
    pub(crate) backslash: u64,
    /// Bytes below 0x20, which JSON forbids inside strings.
    pub(crate) control: u64,
}

/// Bits of the 16 lanes of four vectors whose byte is 0xff.
#[inline(always)]
fn movemask4(v: [u8x16; 4]) -> u64 {
    v.iter().enumerate().fold(0, |m, (k, x)| {
        m | (u64::from(x.move_mask() as u16) << (16 * k))
    })
}

/// The portable kernel (x86-64's baseline SSE2, or NEON); `crate::sys::avx512` and
/// `crate::sys::avx2` have the wider ones for CPUs that have them.
///
/// Why `wide` and not a byte search: a string scan must stop at quotes and
/// backslashes and reject control bytes. `memchr2` stops at every escape (a
/// `\n` or `\"` every ~30 bytes of real prompt text) and still needs a separate
/// control-byte pass; a portable multiply-pack "movemask"
/// spends ~8 multiplies per mask. SSE2/NEON compares plus one `pmovmskb` per 16
/// bytes, through `wide`'s safe wrappers (the crate stays free of `unsafe`), give
/// all three masks; control bytes are exceptional, so their exact mask is only
/// computed when the chunk's minimum byte is one.
#[inline(always)]
fn chunk_masks(chunk: &[u8; STRING_CHUNK]) -> ChunkMasks {
    let v: [u8x16; 4] = std::array::from_fn(|k| {
        let mut lane = [0u8; 16];
        lane.copy_from_slice(&chunk[16 * k..16 * k + 16]);
        u8x16::new(lane)
    });
    let quote = u8x16::splat(b'"');
    let backslash = u8x16::splat(b'\\');
    let below_space = u8x16::splat(0x1f);
    let is_control = |x: u8x16| x.min(below_space).cmp_eq(x);
    let low = v[0].min(v[1]).min(v[2].min(v[3]));
    ChunkMasks {
        quote: movemask4(v.map(|x| x.cmp_eq(quote))),
        backslash: movemask4(v.map(|x| x.cmp_eq(backslash))),
        control: if is_control(low).any() {
            movemask4(v.map(is_control))
        } else {
            0
        },
    }
}

const ODD_BITS: u64 = 0xAAAA_AAAA_AAAA_AAAA;

/// The bytes a backslash escapes, given the chunk's backslashes and `carry` (bit 0
/// set when the previous chunk ended in an unpaired backslash); returns them and
/// the carry for the next chunk. A run of backslashes pairs up from its start, so
/// its odd-numbered members are escapes and the byte after an odd-length run is
/// escaped: simdjson's branchless form of that (`json_escape_scanner`), one
/// subtraction per chunk instead of a step per backslash.
#[inline(always)]
fn escaped_bits(backslash: u64, carry: u64) -> (u64, u64) {
    if backslash == 0 {
        return (carry, 0);
    }
    // A backslash escaped from the previous chunk starts nothing.
    let potential = backslash & !carry;
    let maybe_escaped = potential << 1;
    let escape_and_terminal = (maybe_escaped | ODD_BITS).wrapping_sub(potential) ^ ODD_BITS;
    let escaped = escape_and_terminal ^ (backslash | carry);
    let escapes = escape_and_terminal & backslash;
    (escaped, escapes >> 63)
}

/// Of the positions in `escaped`, those whose byte is not a one-byte escape
/// (`"\/bfnrt`): `\u` escapes and invalid ones. The portable kernel looks each
/// up; `crate::sys::avx2` and `crate::sys::avx512` classify the whole chunk with
/// two table shuffles.
#[inline(always)]
pub(crate) fn not_simple_escapes(chunk: &[u8; STRING_CHUNK], mut escaped: u64) -> u64 {
    let mut out = 0;
    while escaped != 0 {
        let p = escaped.trailing_zeros();
        out |= u64::from(!SIMPLE_ESCAPE[usize::from(chunk[p as usize])]) << p;
        escaped &= escaped - 1;
    }
    out
}

/// Where the string whose contents start at `start` ends (its closing quote),
/// when it is valid. On a fault, `Err` with where the bytewise scan should
/// resume to find and name it: the faulty chunk's start, or the backslash just
/// before it whose escape crosses into it (all before was valid, and the hex
/// digits of a `\u` escape crossing in are plain bytes to it), so a long string
/// with a fault at its end is not walked twice.
/// 64 bytes per step, no branch per escape: the masks give the escaped bytes,
/// the first unescaped quote ends the string, and every byte before it must be
/// no control byte and every escape one JSON allows.
#[inline(always)]
pub(crate) fn valid_string_end_with(
    buf: &[u8],
    start: usize,
    chunk_masks: impl Fn(&[u8; STRING_CHUNK]) -> ChunkMasks,
    not_simple_escapes: impl Fn(&[u8; STRING_CHUNK], u64) -> u64,
) -> Result<usize, usize> {
    let mut base = start;
    let mut carry = 0u64;
    let mut padded = [b' '; STRING_CHUNK];
    loop {
        let (chunk, valid) = match buf.get(base..base + STRING_CHUNK) {
            Some(c) => match <&[u8; STRING_CHUNK]>::try_from(c) {
                Ok(c) => (c, !0u64),
                Err(_) => unreachable!("a 64-byte slice"),
            },
            None => {
                // The last partial chunk, padded; bits past the end are masked.
                let rest = &buf[base..];
                padded[..rest.len()].copy_from_slice(rest);
                (&padded, (1u64 << rest.len()) - 1)
            }
        };
        let resume = base - carry as usize;
        let m = chunk_masks(chunk);
        let (escaped, next_carry) = escaped_bits(m.backslash, carry);
        let ends = m.quote & !escaped & valid;
        // The bytes inside the string: before the closing quote, else all.
        let inside = if ends != 0 {
            (ends & ends.wrapping_neg()) - 1
        } else {
            valid
        };
        if m.control & inside != 0 {
            return Err(resume);
        }
        let esc = escaped & inside;
        if esc != 0 {
            // Usually none: `\u` escapes, and invalid ones, are checked one by one.
            let mut other = not_simple_escapes(chunk, esc);
            while other != 0 {
                let p = other.trailing_zeros() as usize;
                let unicode = chunk[p] == b'u'
                    && buf
                        .get(base + p + 1..base + p + 5)
                        .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
                if !unicode {
                    return Err(resume);
                }
                other &= other - 1;
            }
        }
        if ends != 0 {
            return Ok(base + ends.trailing_zeros() as usize);
        }
        if valid != !0 {
            return Err(resume);
        }
        carry = next_carry;
        base += STRING_CHUNK;
    }
}

/// Where a string ends when its closing quote is among its first 16 bytes with
/// no backslash or control byte before it. Most strings of a request are short
/// (keys, roles, model names: four per chat message), and one 16-byte compare
/// settles them without entering a 64-byte kernel.
#[inline(always)]
fn short_string_end(buf: &[u8], start: usize) -> Option<usize> {
    let lane: [u8; 16] = buf.get(start..start + 16)?.try_into().ok()?;
    let v = u8x16::new(lane);
    let quote = v.cmp_eq(u8x16::splat(b'"')).move_mask() as u32;
    if quote == 0 {
        return None;
    }
    let first = quote.trailing_zeros();
    let is_control = v.min(u8x16::splat(0x1f)).cmp_eq(v);
    let special = (v.cmp_eq(u8x16::splat(b'\\')) | is_control).move_mask() as u32;
    (special & ((1 << first) - 1) == 0).then_some(start + first as usize)
}

/// Whether the scanner may take the AVX-512 and AVX2 kernels where the CPU
/// has them: a build with `--cfg kvroute_simd="avx2"` stops at AVX2 (for CPUs
/// that lower their clock under AVX-512, and to measure what a CPU without it
/// gets), `--cfg kvroute_simd="portable"` at the portable kernel.
#[cfg(target_arch = "x86_64")]
const USE_AVX512: bool = !cfg!(any(kvroute_simd = "avx2", kvroute_simd = "portable"));
#[cfg(target_arch = "x86_64")]
const USE_AVX2: bool = !cfg!(kvroute_simd = "portable");

/// [`valid_string_end_with`] on the widest kernel this CPU runs.
#[inline]
fn valid_string_end(buf: &[u8], start: usize) -> Result<usize, usize> {
    if let Some(end) = short_string_end(buf, start) {
        return Ok(end);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if USE_AVX512 {
            if let Some(end) = crate::sys::avx512::valid_string_end(buf, start) {
                return end;
            }
        }
        if USE_AVX2 {
            if let Some(end) = crate::sys::avx2::valid_string_end(buf, start) {
                return end;
            }
        }
    }
    valid_string_end_with(buf, start, chunk_masks, not_simple_escapes)
}

impl<'a> Scanner<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Scanner { buf, pos: 0 }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn slice_from(&self, start: usize) -> &'a [u8] {
        &self.buf[start..self.pos]
    }

    pub fn error(&self, what: &'static str) -> ExtractError {
        ExtractError::Syntax {
            offset: self.pos,
            what,
        }
    }

    #[inline]
    pub fn skip_ws(&mut self) {
        while let Some(&b) = self.buf.get(self.pos) {
            if !is_ws(b) {
                break;
            }
            self.pos += 1;
        }
    }

    /// The next significant byte, after whitespace.
    #[inline]
    pub fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.buf.get(self.pos).copied()
    }

    fn expect_byte(&mut self, b: u8, what: &'static str) -> Result<(), ExtractError> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(what))
        }
    }

    pub fn expect_end(&mut self) -> Result<(), ExtractError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("trailing characters after the JSON value")),
        }
    }

    /// A string's raw contents (escapes kept). Validates escapes and rejects raw
    /// control bytes; UTF-8 is left to the replica, which sees the same bytes.
    pub fn string(&mut self) -> Result<&'a [u8], ExtractError> {
        self.expect_byte(b'"', "expected a string")?;
        let start = self.pos;
        match valid_string_end(self.buf, start) {
            Ok(end) => {
                self.pos = end + 1;
                Ok(&self.buf[start..end])
            }
            Err(resume) => self.string_bytewise(start, resume),
        }
    }

    /// The same scan a byte at a time from `from` (at or after `start`, outside
    /// any escape): the reference the fast scan is tested against, and the path
    /// that finds and names the first fault of a bad string.
    #[cold]
    #[inline(never)]
    fn string_bytewise(&mut self, start: usize, from: usize) -> Result<&'a [u8], ExtractError> {
        let buf = self.buf;
        let mut i = from;
        while let Some(&b) = buf.get(i) {
            match b {
                b'"' => {
                    self.pos = i + 1;
                    return Ok(&buf[start..i]);
                }
                b'\\' | 0..=0x1f => i += self.escape_or_control(i)?,
                _ => i += 1,
            }
        }
        self.pos = buf.len();
        Err(self.error("unterminated string"))
    }

    /// At a backslash or control byte inside a string: the escape's length, or
    /// the error.
    fn escape_or_control(&mut self, i: usize) -> Result<usize, ExtractError> {
        let buf = self.buf;
        if buf[i] != b'\\' {
            self.pos = i;
            return Err(self.error("control character in string"));
        }
        match buf.get(i + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(2),
            Some(b'u')
                if buf
                    .get(i + 2..i + 6)
                    .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
            {
                Ok(6)
            }
            Some(b'u') => {
                self.pos = i;
                Err(self.error("invalid \\u escape"))
            }
            Some(_) => {
                self.pos = i;
                Err(self.error("invalid escape sequence"))
            }
            None => {
                self.pos = buf.len();
                Err(self.error("unterminated string"))
            }
        }
    }

    /// A number's raw text, checked against JSON's grammar.
    pub fn number(&mut self) -> Result<&'a [u8], ExtractError> {
        self.skip_ws();
        let buf = self.buf;
        let start = self.pos;
        let mut i = start;
        let digits = |i: &mut usize| {
            let s = *i;
            while buf.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i - s
        };
        if buf.get(i) == Some(&b'-') {
            i += 1;
        }
        match buf.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => {
                self.pos = i;
                return Err(self.error("expected a number"));
            }
        }
        if buf.get(i) == Some(&b'.') {
            i += 1;
            if digits(&mut i) == 0 {
                self.pos = i;
                return Err(self.error("expected digits after the decimal point"));
            }
        }
        if matches!(buf.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(buf.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if digits(&mut i) == 0 {
                self.pos = i;
                return Err(self.error("expected digits in the exponent"));
            }
        }
        self.pos = i;
        Ok(&buf[start..i])
    }

    pub fn literal(&mut self) -> Result<Literal, ExtractError> {
        self.skip_ws();
        let rest = &self.buf[self.pos..];
        let (lit, len) = if rest.starts_with(b"true") {
            (Literal::True, 4)
        } else if rest.starts_with(b"false") {
            (Literal::False, 5)
        } else if rest.starts_with(b"null") {
            (Literal::Null, 4)
        } else {
            return Err(self.error("expected a value"));
        };
        self.pos += len;
        Ok(lit)
    }

    /// Consumes `{`.
    pub fn begin_object(&mut self) -> Result<(), ExtractError> {
        self.expect_byte(b'{', "expected an object")
    }

    /// The next key of the current object, positioned at its value; `None` after `}`.
    pub fn next_key(&mut self, first: &mut bool) -> Result<Option<&'a [u8]>, ExtractError> {
        match self.peek() {
            Some(b'}') => {
                self.pos += 1;
                return Ok(None);
            }
            Some(b',') if !*first => self.pos += 1,
            _ if *first => {}
            _ => return Err(self.error("expected ',' or '}' in object")),
        }
        *first = false;
        if self.peek() != Some(b'"') {
            return Err(self.error("expected a string key"));
        }
        let key = self.string()?;
        self.expect_byte(b':', "expected ':' after object key")?;
        self.skip_ws();
        Ok(Some(key))
    }

    /// Consumes `[`.
    pub fn begin_array(&mut self) -> Result<(), ExtractError> {
        self.expect_byte(b'[', "expected an array")
    }

    /// Whether another element follows, positioned at it; consumes `]` at the end.
    pub fn next_element(&mut self, first: &mut bool) -> Result<bool, ExtractError> {
        match self.peek() {
            Some(b']') => {
                self.pos += 1;
                return Ok(false);
            }
            Some(b',') if !*first => self.pos += 1,
            _ if *first => {}
            _ => return Err(self.error("expected ',' or ']' in array")),
        }
        *first = false;
        self.skip_ws();
        Ok(true)
    }

    /// Skips one value of any type, validating it, and returns its raw text. Iterative
    /// (a bit stack of container kinds), so depth costs no call stack.
    pub fn skip_value(&mut self) -> Result<&'a [u8], ExtractError> {
        self.skip_ws();
        let start = self.pos;
        // Bit d set: the container at depth d is an object.
        let mut kinds: u128 = 0;
        let mut depth = 0usize;
        loop {
            // At a value.
            match self.peek() {
                Some(open @ (b'{' | b'[')) => {
                    self.pos += 1;
                    let close = if open == b'{' { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.pos += 1;
                    } else {
                        if depth == MAX_DEPTH {
                            return Err(ExtractError::TooDeep {
                                offset: self.pos,
                                max: MAX_DEPTH,
                            });
                        }
                        if open == b'{' {
                            kinds |= 1 << depth;
                            depth += 1;
                            self.key_colon()?;
                        } else {
                            kinds &= !(1 << depth);
                            depth += 1;
                        }
                        continue;
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b't' | b'f' | b'n') => {
                    self.literal()?;
                }
                Some(b'-' | b'0'..=b'9') => {
                    self.number()?;
                }
                Some(_) => return Err(self.error("expected a value")),
                None => return Err(self.error("unexpected end of input")),
            }
            // After a value: close finished containers, or move to the next value.
            loop {
                if depth == 0 {
                    return Ok(&self.buf[start..self.pos]);
                }
                let in_object = kinds & (1 << (depth - 1)) != 0;
                match (in_object, self.peek()) {
                    (true, Some(b',')) => {
                        self.pos += 1;
                        self.key_colon()?;
                        break;
                    }
                    (false, Some(b',')) => {
                        self.pos += 1;
                        break;
                    }
                    (true, Some(b'}')) | (false, Some(b']')) => {
                        self.pos += 1;
                        depth -= 1;
                    }
                    (true, _) => return Err(self.error("expected ',' or '}' in object")),
                    (false, _) => return Err(self.error("expected ',' or ']' in array")),
                }
            }
        }
    }

    fn key_colon(&mut self) -> Result<(), ExtractError> {
        if self.peek() != Some(b'"') {
            return Err(self.error("expected a string key"));
        }
        self.string()?;
        self.expect_byte(b':', "expected ':' after object key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn skip(s: &str) -> Result<&[u8], ExtractError> {
        let mut sc = Scanner::new(s.as_bytes());
        let v = sc.skip_value()?;
        sc.expect_end()?;
        Ok(v)
    }

    #[test]
    fn skips_valid_values_whole() {
        for v in [
            r#"{"a":[1,2,{"b":null}],"c":"x\"y","d":-1.5e+3}"#,
            "[]",
            "{}",
            "[[],[[]],{}]",
            "true",
            "0",
            r#""\u00e9\n""#,
        ] {
            assert_eq!(skip(v).unwrap(), v.as_bytes(), "{v}");
        }
    }

    #[test]
    fn rejects_invalid_values() {
        for v in [
            "{",
            "[1,]",
            "{\"a\"}",
            "{\"a\":1,}",
            "01",
            "1.",
            "-",
            "\"\\x\"",
            "\"\u{1}\"",
            "\"abc",
            "tru",
            "[1 2]",
            "{1:2}",
            "\"\\u12G4\"",
            "]",
            "",
        ] {
            assert!(skip(v).is_err(), "{v:?} accepted");
        }
    }

    #[test]
    fn strings_keep_escapes_raw() {
        let long = format!("\"{}\\n{}\"", "a".repeat(100), "é".repeat(40));
        let mut sc = Scanner::new(long.as_bytes());
        let s = sc.string().unwrap();
        assert_eq!(s, &long.as_bytes()[1..long.len() - 1]);
    }

    /// Escapes, quotes and bad bytes at every offset around the 64-byte chunks.
    #[test]
    fn chunk_boundaries() {
        for k in 0..200 {
            let pad = "a".repeat(k);
            for (inner, ok) in [
                ("\\n", true),
                ("\\\"", true),
                ("\\\\", true),
                ("\\u00e9x", true),
                ("\\x", false),
                ("\\u0G00", false),
                ("\u{1}", false),
            ] {
                let raw = format!("{pad}{inner}{pad}");
                let s = format!("\"{raw}\"tail");
                let mut sc = Scanner::new(s.as_bytes());
                match sc.string() {
                    Ok(got) => {
                        assert!(ok, "{k} {inner:?} accepted");
                        assert_eq!(got, raw.as_bytes(), "{k} {inner:?}");
                        assert_eq!(&s.as_bytes()[sc.pos()..], b"tail");
                    }
                    Err(_) => assert!(!ok, "{k} {inner:?} rejected"),
                }
            }
            let unterminated = format!("\"{pad}\\");
            assert!(Scanner::new(unterminated.as_bytes()).string().is_err());
        }
    }

    #[test]
    fn depth_is_bounded() {
        // The innermost empty array needs no stack slot.
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert!(matches!(skip(&deep), Err(ExtractError::TooDeep { .. })));
        let ok = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(skip(&ok).is_ok());
    }

    /// The fast scan and the bytewise reference on one body: same slice or same
    /// error (offset included), same position after.
    fn agree(body: &[u8], at: usize) -> Result<(), TestCaseError> {
        let mut fast = Scanner::new(body);
        fast.pos = at;
        let mut slow = Scanner::new(body);
        slow.pos = at;
        let got = fast.string();
        let want = slow
            .expect_byte(b'"', "expected a string")
            .and_then(|()| slow.string_bytewise(slow.pos, slow.pos));
        prop_assert_eq!(&got, &want, "{:?}", String::from_utf8_lossy(body));
        prop_assert_eq!(fast.pos, slow.pos);
        // Every kernel this CPU runs sees the same chunks the same way as the
        // portable one.
        let portable = valid_string_end_with(body, at + 1, chunk_masks, not_simple_escapes);
        prop_assert_eq!(valid_string_end(body, at + 1), portable);
        #[cfg(target_arch = "x86_64")]
        for kernel in [
            crate::sys::avx2::valid_string_end,
            crate::sys::avx512::valid_string_end,
        ] {
            if let Some(got) = kernel(body, at + 1) {
                prop_assert_eq!(got, portable);
            }
        }
        Ok(())
    }

    /// Bytes that matter to a string scan, plus plain ASCII and UTF-8.
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => "[a-z ]{1,20}".prop_map(String::into_bytes),
            1 => Just(b"\"".to_vec()),
            2 => Just(b"\\".to_vec()),
            1 => Just(b"\\\\".to_vec()),
            1 => Just(b"\\n".to_vec()),
            1 => Just(b"\\u00e9".to_vec()),
            1 => Just(b"\\u0".to_vec()),
            1 => Just(b"u12aF".to_vec()),
            1 => Just(b"/bfnrtx".to_vec()),
            1 => (0u8..0x20).prop_map(|b| vec![b]),
            1 => Just(b"\x7f".to_vec()),
            1 => "\\PC{1,4}".prop_map(String::into_bytes),
            1 => any::<u8>().prop_map(|b| vec![b]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random strings of escapes, backslash runs, quotes, control bytes and
        /// unicode, at every alignment and length around the 64-byte chunks.
        #[test]
        fn fast_string_scan_equals_bytewise(
            lead in 0usize..70,
            pieces in proptest::collection::vec(piece(), 0..40),
            close in any::<bool>(),
        ) {
            let mut body = vec![b' '; lead];
            body.push(b'"');
            for p in &pieces {
                body.extend_from_slice(p);
            }
            if close {
                body.extend_from_slice(b"\"tail");
            }
            agree(&body, lead)?;
            // Every suffix start that is a quote: strings beginning mid-chunk.
            for at in 0..body.len().min(200) {
                if body[at] == b'"' {
                    agree(&body, at)?;
                }
            }
        }

        #[test]
        fn fast_string_scan_equals_bytewise_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut body = b"\"".to_vec();
            body.extend_from_slice(&bytes);
            agree(&body, 0)?;
        }
    }
}
