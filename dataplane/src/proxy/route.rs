//! Route phase: what routing needs of a request (its model, prompt block
//! hashes, session), auth's second look (model and prompt bytes), the
//! prediction cache's plan; and the fleet's own answer to `/v1/models`.

use std::time::Instant;

use super::read::Body;
use super::respond::{send_denial, send_error, write_local};
use super::{log, Client, Next, Request, Stream};
use crate::auth::{Caller, Denial};
use crate::http::{ErrorKind, RequestHead};
use crate::io::Runtime;
use crate::prefix::BlockHashes;
use crate::worker::WorkerCtx;

/// What routing and the cache keep of a request past this phase.
pub(super) struct Routing {
    pub(super) model: Option<String>,
    pub(super) hashes: BlockHashes,
    pub(super) prompt_bytes: usize,
    pub(super) session: Option<Vec<u8>>,
    pub(super) cache_plan: crate::cache::Plan,
    pub(super) body_len: usize,
}

/// Why a request goes no further than this phase.
pub(super) enum Refusal {
    /// Its body is not what its endpoint takes (400).
    Invalid(String),
    /// Auth said no to its model or its prompt bytes.
    Denied(Denial),
}

/// Reads the body where it lies (prompt extraction and hashing copy out only
/// the few fields routing keeps), checks it with auth, plans the cache, and
/// samples the prompt for pre-warming standbys.
pub(super) fn prepare<R: Runtime>(
    ctx: &WorkerCtx<R>,
    buf: &[u8],
    head: &RequestHead,
    body: &Body,
    caller: &Caller,
    rq: &Request<'_>,
) -> Result<Routing, Refusal> {
    let shared = &ctx.shared;
    let body_bytes: &[u8] = match body {
        Body::InBuf(r) => &buf[r.clone()],
        Body::Decoded(v) => v,
    };
    let body_len = body_bytes.len();
    let path = rq.path.as_str();
    let a = crate::prefix::analyze(path, body_bytes, &shared.prefix)
        .map_err(|e| Refusal::Invalid(format!("invalid request body: {e}")))?;
    // Auth, phase 2: the model and the prompt bytes, before the cache and
    // routing. Bodies whose prompt kvroute does not extract count whole.
    let charged = if a.endpoint == crate::prompt::Endpoint::Other {
        body_len
    } else {
        a.prompt_bytes
    };
    shared
        .auth
        .check_body(caller, a.fields.model, charged, Instant::now())
        .map_err(Refusal::Denied)?;
    let cache_plan = match &shared.cache {
        Some(c) => c.plan(head, buf, path, &a, body_bytes, caller.tenant()),
        None => crate::cache::Plan::Off,
    };
    let (model, hashes, prompt_bytes, user) = (
        a.fields.model.map(str::to_owned),
        a.hashes,
        a.prompt_bytes,
        a.fields.user.map(|u| u.as_bytes().to_vec()),
    );
    // Sampled for pre-warming standbys: the anchor (the system prompt's blocks)
    // and one request body that starts with it.
    if !hashes.is_empty() && matches!(rq.route, "completions" | "chat_completions") {
        let n = ctx.sampled.get().wrapping_add(1);
        ctx.sampled.set(n);
        if n % crate::hot::SAMPLE_EVERY == 1 {
            let k = shared.routing.anchor_blocks().min(hashes.len());
            shared
                .hot
                .record(hashes[k - 1], model.as_deref(), path, body_bytes);
        }
    }
    let session = head
        .header(buf, &shared.routing.session_header)
        .map(<[u8]>::to_vec)
        .or(user);
    Ok(Routing {
        model,
        hashes,
        prompt_bytes,
        session,
        cache_plan,
        body_len,
    })
}

/// Answers a request [`prepare`] refused; the connection lives on if it may.
pub(super) async fn refuse<R: Runtime>(
    ctx: &WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
    rq: &Request<'_>,
    refusal: Refusal,
) -> Next {
    let close = !rq.keep_alive;
    let status = match refusal {
        Refusal::Invalid(message) => {
            let kind = ErrorKind::BadRequest;
            send_error(client, kind, &message, close, rq.write_limit).await;
            kind.status()
        }
        Refusal::Denied(d) => {
            send_denial(client, &d, close, rq.write_limit).await;
            d.kind.status()
        }
    };
    rq.done(client);
    log::refused(ctx, rq.route, rq.key_label, status);
    rq.next()
}

/// Answers `/v1/models` (and `/v1/models/{id}`) from the fleet, no replica asked.
pub(super) async fn answer_models<R: Runtime>(
    ctx: &WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
    rq: &Request<'_>,
    head: &RequestHead,
    caller: &Caller,
    query: crate::models::Query,
) -> Next {
    let credentials =
        crate::models::Credentials::of(head, &client.buf, ctx.shared.auth.forwarding());
    rq.done(client);
    let (out, status) =
        crate::models::answer(ctx, &query, credentials, caller, rq.keep_alive, rq.is_head).await;
    let (sent, next) = write_local(client, out, rq.keep_alive, rq.write_limit).await;
    ctx.metrics.bytes_out.increment(sent as u64);
    log::finish(ctx, rq, status, Some(crate::models::METRICS_REPLICA));
    next
}
