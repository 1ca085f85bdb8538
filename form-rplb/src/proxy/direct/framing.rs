//! Where a response body relayed byte for byte ends (RFC 9112 6.3): after a length,
//! after the last chunk and its trailers, or when the backend closes. Chunked bodies
//! are scanned, not decoded: the client gets the backend's framing as it was.

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a response to HEAD, 1xx, 204, 304).
    Empty,
    /// `Content-Length` bytes left.
    Length(u64),
    /// Chunked, scanned by [`Chunks`].
    Chunked(Chunks),
    /// Until the backend closes the connection.
    UntilClose,
}

/// A chunked body that breaks the framing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked framing")]
pub struct Invalid;

impl Framing {
    /// Feeds the next bytes of the body: how many of them belong to it, and whether
    /// the body ended with them. Bytes after the end are not the body's.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), Invalid> {
        match self {
            Self::Empty => Ok((0, true)),
            Self::Length(left) => {
                let take = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                *left -= take as u64;
                Ok((take, *left == 0))
            }
            Self::Chunked(c) => c.feed(bytes),
            Self::UntilClose => Ok((bytes.len(), false)),
        }
    }

    /// Whether nothing more is expected.
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Empty | Self::Length(0))
    }

    /// Whether the end of the body leaves the connection usable for another request.
    pub fn keeps_connection(&self) -> bool {
        !matches!(self, Self::UntilClose)
    }
}

/// Where a scan of chunked framing is. Lines end with CRLF; a bare LF, or anything
/// but a chunk extension after a size, is refused, so the balancer never finds the end
/// somewhere a strict client would not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// In a chunk-size line's digits.
    Size,
    /// In a chunk-size line's extensions (after `;` or whitespace), up to its CR.
    SizeRest,
    /// At the LF of a chunk-size line.
    SizeLf,
    /// In chunk data, with this many bytes left.
    Data(u64),
    /// At the CR after chunk data.
    DataCr,
    /// At the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// In a trailer line, up to its CR.
    Trailer,
    /// At the LF of a trailer line.
    TrailerLf,
    /// At the LF of the final empty line.
    FinalLf,
    /// After the final empty line.
    Done,
}

/// A scan of chunked framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunks {
    at: At,
    size: u64,
    /// Digits of the size read, and of them those after leading zeros.
    digits: u8,
    significant: u8,
}

impl Default for Chunks {
    fn default() -> Self {
        Self {
            at: At::Size,
            size: 0,
            digits: 0,
            significant: 0,
        }
    }
}

impl Chunks {
    fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), Invalid> {
        let mut i = 0;
        while i < bytes.len() {
            match self.at {
                At::Done => return Ok((i, true)),
                At::Data(left) => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    i += take;
                    let left = left - take as u64;
                    self.at = if left == 0 {
                        At::DataCr
                    } else {
                        At::Data(left)
                    };
                    continue;
                }
                _ => {}
            }
            let b = bytes[i];
            i += 1;
            self.at = match (self.at, b) {
                (At::Size, b) if b.is_ascii_hexdigit() => {
                    self.digits = self.digits.saturating_add(1);
                    if self.size > 0 || b != b'0' {
                        // 15 significant hex digits exceed any body worth relaying.
                        self.significant += 1;
                        if self.significant > 15 {
                            return Err(Invalid);
                        }
                    }
                    self.size = self.size * 16 + u64::from(hex(b));
                    At::Size
                }
                (At::Size, b';' | b' ' | b'\t') if self.digits > 0 => At::SizeRest,
                (At::Size | At::SizeRest, b'\r') if self.digits > 0 => At::SizeLf,
                (At::SizeRest, b) if b != b'\n' => At::SizeRest,
                (At::SizeLf, b'\n') => self.end_size_line(),
                (At::DataCr, b'\r') => At::DataLf,
                (At::DataLf, b'\n') => At::Size,
                (At::TrailerStart, b'\r') => At::FinalLf,
                (At::FinalLf, b'\n') => At::Done,
                (At::Trailer, b'\r') => At::TrailerLf,
                (At::TrailerStart | At::Trailer, b) if b != b'\n' => At::Trailer,
                (At::TrailerLf, b'\n') => At::TrailerStart,
                _ => return Err(Invalid),
            };
        }
        Ok((i, self.at == At::Done))
    }

    fn end_size_line(&mut self) -> At {
        let size = std::mem::take(&mut self.size);
        self.digits = 0;
        self.significant = 0;
        if size == 0 {
            At::TrailerStart
        } else {
            At::Data(size)
        }
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step` bytes: bytes taken and whether it ended.
    fn scan(body: &[u8], step: usize) -> Result<(usize, bool), Invalid> {
        let mut f = Framing::Chunked(Chunks::default());
        let mut taken = 0;
        for piece in body.chunks(step) {
            let (n, done) = f.feed(piece)?;
            taken += n;
            if done {
                return Ok((taken, true));
            }
        }
        Ok((taken, false))
    }

    #[test]
    fn chunked_bodies_end_after_the_last_chunk_and_trailers_in_any_split() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for step in 1..=body.len() {
            assert_eq!(scan(body, step), Ok((end, true)), "step {step}");
        }
        assert_eq!(scan(b"0\r\n\r\n", 2), Ok((5, true)));
        assert_eq!(scan(b"3\r\nab", 64), Ok((5, false)));
    }

    #[test]
    fn broken_chunked_framing_is_refused() {
        assert_eq!(scan(b"zz\r\n", 64), Err(Invalid));
        assert_eq!(scan(b"\r\n", 64), Err(Invalid));
        assert_eq!(scan(b"2\r\nabX", 64), Err(Invalid));
        assert_eq!(scan(b"ffffffffffffffff\r\n", 64), Err(Invalid));
        // Bare LFs, stray CRs and junk after a size.
        assert_eq!(scan(b"2\nab\r\n", 64), Err(Invalid));
        assert_eq!(scan(b"2\r\nab\n0\r\n\r\n", 64), Err(Invalid));
        assert_eq!(scan(b"2\r\nab\r\r\n", 64), Err(Invalid));
        assert_eq!(scan(b"2x\r\nab\r\n", 64), Err(Invalid));
        assert_eq!(scan(b"0\r\n\n", 64), Err(Invalid));
        assert_eq!(scan(b"0\r\nx-t: 1\n\r\n", 64), Err(Invalid));
        // Leading zeros are not significant.
        assert_eq!(
            scan(b"00000000000000000002\r\nab\r\n0\r\n\r\n", 1),
            Ok((31, true))
        );
    }

    #[test]
    fn lengths_take_what_is_left_and_close_delimited_bodies_never_end() {
        let mut f = Framing::Length(5);
        assert_eq!(f.feed(b"abc"), Ok((3, false)));
        assert_eq!(f.feed(b"defg"), Ok((2, true)));
        assert!(f.is_done());
        let mut f = Framing::UntilClose;
        assert_eq!(f.feed(b"abc"), Ok((3, false)));
        assert!(!f.keeps_connection());
        assert_eq!(Framing::Empty.feed(b"x"), Ok((0, true)));
    }
}
