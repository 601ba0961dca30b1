//! The SSE wire format of job events, rendered once and shared by every subscriber.
//!
//! A job event goes to every subscriber of its job and of its owner, up to thousands of
//! connections. Rendering it per subscriber (serialising the JSON, formatting the `id:` /
//! `event:` / `data:` lines) was most of the server's fan-out cost, so the hub renders
//! each event's frames once at publish ([`render_event`]) and streams write those shared
//! [`Bytes`] as they are. When several frames are ready for one connection they are joined
//! into one body chunk ([`Batch`]), bounded by [`MAX_CHUNK`], so a subscriber that is
//! behind catches up with one write instead of one per event.
//!
//! The layout is byte for byte what axum's `sse::Event` produced before
//! (`id: …\nevent: …\ndata: …\n\n`, keep-alive `: keepalive\n\n`); a test below checks it
//! against axum itself.

use std::fmt::{self, Write as _};

use bytes::{BufMut, Bytes, BytesMut};

/// The keep-alive comment sent after `events::sse::KEEPALIVE` without any other write.
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Frames are joined into one chunk until it reaches this many bytes (one frame may take
/// it over the bound; a single large frame is sent alone, never copied).
///
/// About 20 typical frames (150–250 bytes): enough to amortise the per-write cost (a
/// syscall and, on loopback, the receiver's TCP work). Kept small because a joined chunk is
/// a per-connection copy, and hyper buffers up to 16 chunks for a client that does not
/// read: at most 64 KiB per stuck connection, and only when it was also starved of CPU
/// (a chunk of one frame shares the hub's bytes and costs nothing).
pub const MAX_CHUNK: usize = 4 * 1024;

/// Appends one event: `id: {id}\nevent: {event}\ndata: {data}\n\n`.
///
/// Like axum's `Event::data`, a line break in `data` continues it on a new `data: ` line
/// (compact JSON never has one). `id` and `event` are our own ids and event names, which
/// never contain line breaks; should one, it is dropped rather than ending the field early
/// (axum panicked).
pub fn write_event(out: &mut BytesMut, id: fmt::Arguments<'_>, event: &str, data: &str) {
    out.reserve(data.len() + event.len() + 32);
    out.put_slice(b"id: ");
    let start = out.len();
    // Writing into a BytesMut cannot fail.
    let _ = out.write_fmt(id);
    strip_line_breaks(out, start);
    out.put_slice(b"\nevent: ");
    let start = out.len();
    out.put_slice(event.as_bytes());
    strip_line_breaks(out, start);
    out.put_slice(b"\ndata: ");
    let data = data.as_bytes();
    let mut from = 0;
    for (i, b) in data.iter().enumerate() {
        if matches!(b, b'\n' | b'\r') {
            out.put_slice(&data[from..=i]);
            out.put_slice(b"data: ");
            from = i + 1;
        }
    }
    out.put_slice(&data[from..]);
    out.put_slice(b"\n\n");
}

/// Removes `\r`, `\n` and NUL written after `start` (a field value must not hold them).
fn strip_line_breaks(out: &mut BytesMut, start: usize) {
    if out[start..].iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        let clean: Vec<u8> = out[start..]
            .iter()
            .copied()
            .filter(|b| !matches!(b, b'\r' | b'\n' | 0))
            .collect();
        out.truncate(start);
        out.put_slice(&clean);
    }
}

/// One event rendered for both kinds of stream, sharing one allocation: the per-job
/// stream's frame (`id: {seq}`) and the per-user stream's (`id: {job_id}:{seq}`).
pub fn render_event(job_id: &str, seq: u64, event: &str, data: &str) -> (Bytes, Bytes) {
    let mut buf = BytesMut::with_capacity(2 * (data.len() + event.len() + 40) + job_id.len());
    write_event(&mut buf, format_args!("{seq}"), event, data);
    let job_frame = buf.split().freeze();
    write_event(&mut buf, format_args!("{job_id}:{seq}"), event, data);
    (job_frame, buf.freeze())
}

/// Frames ready for one connection, joined into one body chunk.
///
/// One frame is passed on as it is (a reference count, no copy); only when a second one
/// joins are they copied into one buffer. Callers stop adding once [`Batch::is_full`].
#[derive(Default)]
pub struct Batch {
    one: Option<Bytes>,
    many: BytesMut,
}

impl Batch {
    pub fn push(&mut self, frame: &Bytes) {
        if frame.is_empty() {
            return;
        }
        if self.many.is_empty() {
            match self.one.take() {
                None => {
                    self.one = Some(frame.clone());
                    return;
                }
                Some(first) => {
                    self.many
                        .reserve((2 * (first.len() + frame.len())).min(MAX_CHUNK));
                    self.many.put_slice(&first);
                }
            }
        }
        self.many.put_slice(frame);
    }

    /// Bytes collected so far.
    pub fn len(&self) -> usize {
        self.one.as_ref().map_or(0, Bytes::len) + self.many.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the chunk reached [`MAX_CHUNK`]: send it before adding more.
    pub fn is_full(&self) -> bool {
        self.len() >= MAX_CHUNK
    }

    /// The chunk, leaving the batch empty; None if nothing was added.
    pub fn take(&mut self) -> Option<Bytes> {
        if let Some(one) = self.one.take() {
            return Some(one);
        }
        if self.many.is_empty() {
            None
        } else {
            Some(self.many.split().freeze())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    use http_body_util::BodyExt;
    use std::convert::Infallible;

    /// What axum's `Sse` writes for these events (the format the streams used before).
    async fn axum_bytes(events: Vec<Event>) -> Vec<u8> {
        let stream = futures_util::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
        let body = Sse::new(stream).into_response().into_body();
        body.collect().await.expect("body").to_bytes().to_vec()
    }

    #[tokio::test]
    async fn frames_are_byte_identical_to_axum_events() {
        let cases = [
            (
                "7",
                "state",
                r#"{"attempt":1,"id":"j1","status":"running"}"#,
            ),
            (
                "j1:8",
                "progress",
                r#"{"id":"j1","message":"step 2/5 ü","pct":40}"#,
            ),
            ("3", "done", "{}"),
            ("4", "odd", "two\nlines\r\nand\rmore"),
            ("5", "empty", ""),
        ];
        for (id, name, data) in cases {
            let mut ours = BytesMut::new();
            write_event(&mut ours, format_args!("{id}"), name, data);
            let theirs = axum_bytes(vec![Event::default().id(id).event(name).data(data)]).await;
            // axum leaves out an empty `data:` line; our events always carry JSON.
            if data.is_empty() {
                assert_eq!(&ours[..], b"id: 5\nevent: empty\ndata: \n\n");
                continue;
            }
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_matches_axum() {
        let stream = futures_util::stream::pending::<Result<Event, Infallible>>();
        let mut body = Sse::new(stream)
            .keep_alive(KeepAlive::new().text("keepalive"))
            .into_response()
            .into_body();
        let frame = body.frame().await.expect("frame").expect("ok");
        let data = frame.into_data().expect("data");
        assert_eq!(&data[..], KEEPALIVE);
    }

    #[test]
    fn both_frames_come_from_one_render() {
        let (job, user) = render_event("01ABC", 12, "progress", r#"{"pct":5}"#);
        assert_eq!(&job[..], b"id: 12\nevent: progress\ndata: {\"pct\":5}\n\n");
        assert_eq!(
            &user[..],
            b"id: 01ABC:12\nevent: progress\ndata: {\"pct\":5}\n\n"
        );
    }

    #[test]
    fn line_breaks_never_leave_the_id_field() {
        let mut out = BytesMut::new();
        write_event(&mut out, format_args!("a\nb\r\0c"), "st\nate", "{}");
        assert_eq!(&out[..], b"id: abc\nevent: state\ndata: {}\n\n");
    }

    #[test]
    fn a_batch_of_one_is_the_frame_itself() {
        let frame = Bytes::from_static(b"id: 1\nevent: state\ndata: {}\n\n");
        let mut b = Batch::default();
        assert!(b.is_empty());
        assert_eq!(b.take(), None);
        b.push(&frame);
        let out = b.take().expect("chunk");
        assert_eq!(out.as_ptr(), frame.as_ptr(), "no copy for a single frame");
        assert!(b.is_empty());
    }

    #[test]
    fn a_batch_joins_frames_in_order_up_to_the_bound() {
        let frame = |i: usize| Bytes::from(format!("id: {i}\nevent: progress\ndata: {{}}\n\n"));
        let mut b = Batch::default();
        let mut want = Vec::new();
        let mut i = 0;
        while !b.is_full() {
            let f = frame(i);
            want.extend_from_slice(&f);
            b.push(&f);
            i += 1;
        }
        assert!(i > 2);
        let chunk = b.take().expect("chunk");
        assert_eq!(&chunk[..], &want[..]);
        assert!(chunk.len() >= MAX_CHUNK && chunk.len() < MAX_CHUNK + frame(i).len());
        assert!(b.take().is_none());
        // Reusable after take.
        b.push(&frame(1));
        b.push(&frame(2));
        assert_eq!(
            b.take().expect("chunk").len(),
            frame(1).len() + frame(2).len()
        );
    }
}
