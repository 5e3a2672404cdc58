//! Lists and watches: the list/watch semantics kube-rs's watcher depends on.

use super::*;

pub(super) fn list(
    shared: &Shared,
    resource: Resource,
    selector: &LabelSelector,
) -> Response<Body> {
    let mut inner = shared.inner.lock().expect("fake API server lock");
    count(&mut inner, format!("list {}", resource.path));
    let items = selected(&inner, &resource, selector);
    let body = json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version,
        "metadata": {"resourceVersion": inner.rv.to_string()},
        "items": items,
    });
    json_response(StatusCode::OK, &body)
}

pub(super) fn watch(
    shared: &Arc<Shared>,
    resource: Resource,
    query: &HashMap<String, String>,
    selector: LabelSelector,
) -> Response<Body> {
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let since: Option<u64> = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && v.as_str() != "0")
        .map(|v| v.parse().unwrap_or(0));
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let shared = shared.clone();
    {
        let mut inner = shared.inner.lock().expect("fake API server lock");
        count(&mut inner, format!("watch {}", resource.path));
    }
    tokio::spawn(async move {
        let _ = stream_watch(&shared, resource, &selector, since, timeout, tx).await;
    });
    let body =
        StreamBody::new(ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|_| Response::new(empty()))
}

fn line(event: &Value) -> Bytes {
    let mut s = event.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// Streams changes of `resource` after `since` (everything current when
/// `None`, as "watch from any version" does) until the timeout, a
/// `close_watches`, or the client going away.
async fn stream_watch(
    shared: &Shared,
    resource: Resource,
    selector: &LabelSelector,
    since: Option<u64>,
    timeout: Duration,
    tx: mpsc::Sender<Bytes>,
) -> Result<(), mpsc::error::SendError<Bytes>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut generation = shared.generation.subscribe();
    let mut changed = shared.changed.subscribe();
    let mut paused = shared.paused.subscribe();
    let mut bookmarks = tokio::time::interval(shared.bookmark_interval);
    bookmarks.tick().await;

    let mut last = match since {
        Some(rv) => {
            let expired = {
                let mut inner = shared.inner.lock().expect("fake API server lock");
                let expired = rv < inner.oldest;
                if expired {
                    count(&mut inner, format!("expired {}", resource.path));
                }
                expired
            };
            if expired {
                tx.send(line(&json!({
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": format!("too old resource version: {rv}"),
                        "reason": "Expired",
                        "code": 410,
                    },
                })))
                .await?;
                return Ok(());
            }
            rv
        }
        None => {
            let (rv, objects) = {
                let inner = shared.inner.lock().expect("fake API server lock");
                let objects = selected(&inner, &resource, selector);
                (inner.rv, objects)
            };
            for object in objects {
                tx.send(line(&json!({"type": "ADDED", "object": object})))
                    .await?;
            }
            rv
        }
    };

    loop {
        if !*paused.borrow_and_update() {
            // A change the selector filters out still counts as delivered,
            // or bookmarks would wait for it forever. An object leaving the
            // selection is not turned into DELETED, as the real server does.
            let pending: Vec<(u64, Option<Value>)> = {
                let inner = shared.inner.lock().expect("fake API server lock");
                inner
                    .history
                    .iter()
                    .filter(|c| c.rv > last && c.resource == resource)
                    .map(|c| {
                        let event = selector
                            .matches(&c.object)
                            .then(|| json!({"type": c.kind, "object": c.object}));
                        (c.rv, event)
                    })
                    .collect()
            };
            for (rv, event) in pending {
                last = rv;
                if let Some(event) = event {
                    tx.send(line(&event)).await?;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = generation.changed() => return Ok(()),
            _ = tx.closed() => return Ok(()),
            r = changed.changed() => if r.is_err() { return Ok(()) },
            r = paused.changed() => if r.is_err() { return Ok(()) },
            _ = bookmarks.tick() => {
                if *paused.borrow() {
                    continue;
                }
                // Only versions whose changes were all delivered may be
                // bookmarked, or the client would skip them on resume.
                let rv = {
                    let inner = shared.inner.lock().expect("fake API server lock");
                    let undelivered = inner.history.iter().any(|c| c.rv > last && c.resource == resource);
                    if undelivered { None } else { Some(inner.rv) }
                };
                if let Some(rv) = rv {
                    last = last.max(rv);
                    tx.send(line(&json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": resource.kind,
                            "apiVersion": resource.api_version,
                            "metadata": {"resourceVersion": rv.to_string()},
                        },
                    })))
                    .await?;
                }
            }
        }
    }
}
