//! A small blocking HTTP/1.1 client over `std::net`, enough for the load generator and
//! the end-to-end tests: one request per connection, fixed-length or chunked bodies, and
//! server-sent events read as they arrive.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `http://host:port` → `host:port`.
pub fn authority(url: &str) -> io::Result<String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{url}: only http:// URLs are supported"),
        )
    })?;
    Ok(rest.trim_end_matches('/').to_owned())
}

/// A response whose body has not been read yet.
pub struct Response {
    pub status: u16,
    #[allow(dead_code)] // read by the end-to-end tests
    pub headers: Vec<(String, String)>,
    body: Body,
}

enum Framing {
    Length(usize),
    Chunked { left: usize, done: bool },
    UntilClose,
}

struct Body {
    reader: BufReader<TcpStream>,
    framing: Framing,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.framing {
            Framing::Length(left) => {
                let n = (*left).min(buf.len());
                if n == 0 {
                    return Ok(0);
                }
                let got = self.reader.read(&mut buf[..n])?;
                if got == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the end of the body",
                    ));
                }
                *left -= got;
                Ok(got)
            }
            Framing::UntilClose => self.reader.read(buf),
            Framing::Chunked { left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let mut line = String::new();
                    self.reader.read_line(&mut line)?;
                    let size = line.trim().split(';').next().unwrap_or("");
                    let size = usize::from_str_radix(size, 16)
                        .map_err(|_| bad(format!("bad chunk size line {line:?}")))?;
                    if size == 0 {
                        // Trailers, then the blank line.
                        loop {
                            let mut l = String::new();
                            if self.reader.read_line(&mut l)? == 0 || l.trim().is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(0);
                    }
                    *left = size;
                }
                let n = (*left).min(buf.len());
                let got = self.reader.read(&mut buf[..n])?;
                if got == 0 {
                    return Err(bad("connection closed inside a chunk"));
                }
                *left -= got;
                if *left == 0 {
                    let mut crlf = [0u8; 2];
                    self.reader.read_exact(&mut crlf)?;
                }
                Ok(got)
            }
        }
    }
}

/// Sends one request (`Connection: close`) and reads the status line and headers.
pub fn send(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<Response> {
    let mut stream = TcpStream::connect(authority)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    // A server may answer before reading the whole body (413) and close: then the
    // write fails, but its response is what matters.
    let written = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.unwrap_or_default()));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => {}
        other => {
            written?;
            other?;
            return Err(bad("connection closed before the status line"));
        }
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l)? == 0 {
            return Err(bad("connection closed in the headers"));
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let framing = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        Framing::Chunked {
            left: 0,
            done: false,
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse().ok()) {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(Response {
        status,
        headers,
        body: Body { reader, framing },
    })
}

impl Response {
    #[allow(dead_code)] // used by the end-to-end tests
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The whole body.
    pub fn bytes(mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.body.read_to_end(&mut out)?;
        Ok(out)
    }

    pub fn text(self) -> io::Result<String> {
        String::from_utf8(self.bytes()?).map_err(|e| bad(e.to_string()))
    }

    /// The body as server-sent events: each call returns the next event's `data`, or
    /// `None` at the end of the stream.
    pub fn events(self) -> Events {
        Events {
            lines: BufReader::new(self.body),
        }
    }
}

pub struct Events {
    lines: BufReader<Body>,
}

impl Events {
    pub fn next_data(&mut self) -> io::Result<Option<String>> {
        let mut data: Option<String> = None;
        loop {
            let mut line = String::new();
            if self.lines.read_line(&mut line)? == 0 {
                return Ok(data);
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_some() {
                    return Ok(data);
                }
                continue;
            }
            if let Some(d) = line.strip_prefix("data:") {
                let d = d.strip_prefix(' ').unwrap_or(d);
                match &mut data {
                    Some(s) => {
                        s.push('\n');
                        s.push_str(d);
                    }
                    None => data = Some(d.to_owned()),
                }
            }
        }
    }
}
