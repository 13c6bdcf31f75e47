//! The stand-in's HTTP/1.1: keep-alive connections (the client pools them), requests without
//! bodies, List responses with a Content-Length, watches as chunked streams of JSON lines.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Write},
    net::{Shutdown, TcpStream},
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;

use super::{
    BOOKMARK_INTERVAL, Request, Resource, Shared, bookmark, events_after, gone, list,
    watch_deadline,
};

/// How often an idle connection or a quiet watch looks at the server's state (outage, stop).
const STATE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

struct ParsedRequest {
    path: String,
    query: BTreeMap<String, String>,
}

pub fn serve_connection(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(STATE_CHECK_INTERVAL))?;
    let generation = shared.lock().connection_generation;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some(request) = read_request(&mut reader, shared, generation)? else {
            return Ok(());
        };
        let delay = shared.lock().response_delay;
        thread::sleep(delay);
        if cut(shared, generation) {
            return writer.shutdown(Shutdown::Both);
        }
        let resource = [Resource::Services, Resource::EndpointSlices]
            .into_iter()
            .find(|resource| resource.path() == request.path);
        let Some(resource) = resource else {
            respond(&mut writer, "404 Not Found", &not_found(&request.path))?;
            continue;
        };
        let watch = matches!(
            request.query.get("watch").map(String::as_str),
            Some("true" | "1")
        );
        if watch {
            let since = request
                .query
                .get("resourceVersion")
                .and_then(|version| version.parse().ok())
                .unwrap_or(0);
            let bookmarks =
                request.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
            let timeout = request
                .query
                .get("timeoutSeconds")
                .and_then(|seconds| seconds.parse().ok());
            if !stream_watch(
                &mut writer,
                shared,
                generation,
                resource,
                since,
                bookmarks,
                timeout,
            )? {
                return writer.shutdown(Shutdown::Both);
            }
        } else {
            let body = {
                let mut state = shared.lock();
                state.requests.push(Request::List(resource));
                list(&state, resource)
            };
            respond(&mut writer, "200 OK", &body)?;
            shared
                .lock()
                .lists_written
                .insert(resource, SystemTime::now());
        }
    }
}

/// Reads one request head; None when the client closed the connection or the server cut it.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    shared: &Shared,
    generation: u64,
) -> io::Result<Option<ParsedRequest>> {
    let mut head = String::new();
    // Outside the loop: a read timeout may return with half a line already appended.
    let mut line = String::new();
    loop {
        if cut(shared, generation) {
            return Ok(None);
        }
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {
                if line == "\r\n" && !head.is_empty() {
                    break;
                }
                head.push_str(&line);
                line.clear();
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(error) => return Err(error),
        }
    }
    let target = head.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
    Ok(Some(ParsedRequest {
        path: path.to_owned(),
        query,
    }))
}

/// Whether the server cut this connection (outage, drop, stop) since it was accepted.
fn cut(shared: &Shared, generation: u64) -> bool {
    let state = shared.lock();
    state.stopping || state.outage || state.connection_generation != generation
}

fn respond(writer: &mut TcpStream, status: &str, body: &Value) -> io::Result<()> {
    let body = serde_json::to_vec(body).map_err(io::Error::other)?;
    write!(
        writer,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    writer.write_all(&body)?;
    writer.flush()
}

fn not_found(path: &str) -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("the server could not find the requested resource ({path})"),
        "reason": "NotFound", "code": 404
    })
}

fn chunk(writer: &mut TcpStream, line: &Value) -> io::Result<()> {
    let mut data = serde_json::to_vec(line).map_err(io::Error::other)?;
    data.push(b'\n');
    write!(writer, "{:x}\r\n", data.len())?;
    writer.write_all(&data)?;
    writer.write_all(b"\r\n")?;
    writer.flush()
}

/// Streams the events of `resource` after `since` until the watch times out (Ok(true): the
/// connection stays usable) or the server cuts it (Ok(false)).
fn stream_watch(
    writer: &mut TcpStream,
    shared: &Shared,
    generation: u64,
    resource: Resource,
    since: u64,
    bookmarks: bool,
    timeout_seconds: Option<u64>,
) -> io::Result<bool> {
    write!(
        writer,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let deadline = watch_deadline(timeout_seconds);
    let mut sent_up_to = since;
    let mut last_bookmark = Instant::now();
    let mut state = shared.lock();
    state.requests.push(Request::Watch {
        resource,
        resource_version: since,
    });
    if since < state.oldest_watchable {
        let error = gone(since, state.oldest_watchable);
        drop(state);
        chunk(writer, &error)?;
        writer.write_all(b"0\r\n\r\n")?;
        return Ok(true);
    }
    loop {
        if state.stopping || state.outage || state.connection_generation != generation {
            return Ok(false);
        }
        let events = events_after(&state, resource, sent_up_to);
        let current = state.resource_version;
        drop(state);
        for (resource_version, event) in &events {
            chunk(writer, event)?;
            let written = SystemTime::now();
            shared
                .lock()
                .events_written
                .entry(*resource_version)
                .or_insert(written);
        }
        sent_up_to = current;
        if bookmarks && last_bookmark.elapsed() >= BOOKMARK_INTERVAL {
            chunk(writer, &bookmark(resource, current))?;
            last_bookmark = Instant::now();
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            writer.write_all(b"0\r\n\r\n")?;
            return Ok(true);
        }
        state = shared.lock();
        if state.resource_version == sent_up_to {
            state = shared
                .changed
                .wait_timeout(state, STATE_CHECK_INTERVAL)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}
