//! Log phase: each request counted once in `kvroute_requests_total` (route,
//! status, replica, API key name), and the duration of those that got an
//! answer. Never the prompt, never the key itself.

use super::Request;
use crate::io::Runtime;
use crate::worker::WorkerCtx;

/// A request answered (by a replica, the fleet, the cache, or an error after
/// routing): counted, with its duration.
pub(super) fn finish<R: Runtime>(
    ctx: &WorkerCtx<R>,
    rq: &Request<'_>,
    status: u16,
    replica: Option<(u16, &str)>,
) {
    ctx.metrics.request(rq.route, status, replica, rq.key_label);
    ctx.metrics
        .duration(rq.route, rq.started.elapsed().as_secs_f64());
}

/// A request refused before routing: counted, without a duration.
pub(super) fn refused<R: Runtime>(
    ctx: &WorkerCtx<R>,
    route: &'static str,
    key_label: &str,
    status: u16,
) {
    ctx.metrics.request(route, status, None, key_label);
}
