//! The shared retry policy, `clients/service_config.json`, applied by hand.
//!
//! tonic has no gRPC service config, so this module reads the standard JSON
//! (`methodConfig` with `name`, `timeout` and `retryPolicy`) and [`call`]
//! runs one unary call under it: a deadline for the whole call, and for the
//! methods that are safe to repeat, up to `maxAttempts` tries on the
//! retryable codes with exponential backoff, randomised the way gRPC does it
//! (each pause uniform in `0..=backoff`). Streams are never retried.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::error::Error;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use serde_json::Value;
use tokio::time::{Instant, sleep, timeout_at};
use tonic::{Code, Request, Response, Status};

/// gRPC caps `maxAttempts` at 5 whatever the config says.
const MAX_ATTEMPTS_CAP: u32 = 5;

#[derive(Clone, Debug, Default)]
pub struct MethodConfig {
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub backoff_multiplier: f64,
    pub retryable: Vec<Code>,
}

/// Method configs keyed by `service/method`, or `service/` for a whole service.
#[derive(Debug, Default)]
pub struct ServiceConfig {
    methods: HashMap<String, MethodConfig>,
}

impl ServiceConfig {
    pub fn from_json(text: &str) -> Result<Self, Box<dyn Error>> {
        let root: Value = serde_json::from_str(text)?;
        let mut methods = HashMap::new();
        for entry in root["methodConfig"].as_array().into_iter().flatten() {
            let config = MethodConfig {
                timeout: entry.get("timeout").map(duration).transpose()?,
                retry: entry.get("retryPolicy").map(retry_policy).transpose()?,
            };
            for name in entry["name"].as_array().into_iter().flatten() {
                let service = name["service"].as_str().unwrap_or_default();
                let method = name["method"].as_str().unwrap_or_default();
                methods.insert(format!("{service}/{method}"), config.clone());
            }
        }
        Ok(Self { methods })
    }

    /// The config of one method, from its full path (`/pkg.Service/Method`):
    /// the method's own entry wins over its service's.
    pub fn method(&self, path: &str) -> MethodConfig {
        let path = path.trim_start_matches('/');
        let service = path.split_once('/').map_or(path, |(s, _)| s);
        self.methods
            .get(path)
            .or_else(|| self.methods.get(&format!("{service}/")))
            .cloned()
            .unwrap_or_default()
    }
}

fn retry_policy(v: &Value) -> Result<RetryPolicy, Box<dyn Error>> {
    let retryable = v["retryableStatusCodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c.as_str().and_then(code_from_name).ok_or_else(|| format!("unknown status code {c}")))
        .collect::<Result<_, _>>()?;
    let attempts = v["maxAttempts"].as_u64().ok_or("retryPolicy needs maxAttempts")?;
    Ok(RetryPolicy {
        max_attempts: (attempts as u32).clamp(1, MAX_ATTEMPTS_CAP),
        initial_backoff: duration(&v["initialBackoff"])?,
        max_backoff: duration(&v["maxBackoff"])?,
        backoff_multiplier: v["backoffMultiplier"].as_f64().ok_or("retryPolicy needs backoffMultiplier")?,
        retryable,
    })
}

/// A protobuf JSON duration: `"10s"`, `"0.2s"`.
fn duration(v: &Value) -> Result<Duration, Box<dyn Error>> {
    let text = v.as_str().ok_or_else(|| format!("a duration must be a string, got {v}"))?;
    let seconds: f64 = text.strip_suffix('s').ok_or_else(|| format!("bad duration {text:?}"))?.parse()?;
    Ok(Duration::try_from_secs_f64(seconds)?)
}

/// Runs one unary call under `config`. `make` builds a fresh request for
/// every attempt; `send` performs it.
pub async fn call<Req, Resp, Fut>(
    config: &MethodConfig,
    mut make: impl FnMut() -> Request<Req>,
    mut send: impl FnMut(Request<Req>) -> Fut,
) -> Result<Response<Resp>, Status>
where
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    let deadline = config.timeout.map(|t| Instant::now() + t);
    let attempts = config.retry.as_ref().map_or(1, |p| p.max_attempts);
    let mut backoff = config.retry.as_ref().map_or(Duration::ZERO, |p| p.initial_backoff);
    let mut attempt = 1;
    loop {
        let mut request = make();
        let result = match deadline {
            Some(deadline) => {
                request.set_timeout(deadline.saturating_duration_since(Instant::now()));
                timeout_at(deadline, send(request))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("deadline exceeded")))
            }
            None => send(request).await,
        };
        let status = match result {
            Err(status) => status,
            ok => return ok,
        };
        let Some(policy) = config.retry.as_ref() else { return Err(status) };
        let pause = jitter(backoff);
        if attempt >= attempts
            || !policy.retryable.contains(&status.code())
            || deadline.is_some_and(|d| Instant::now() + pause >= d)
        {
            return Err(status);
        }
        eprintln!("· {}: {}, retry {attempt} in {pause:?}", code_name(status.code()), status.message());
        sleep(pause).await;
        backoff = backoff.mul_f64(policy.backoff_multiplier).min(policy.max_backoff);
        attempt += 1;
    }
}

/// Uniform in `0..=max`, from the standard library's per-process random hash keys.
fn jitter(max: Duration) -> Duration {
    let r = RandomState::new().build_hasher().finish();
    max.mul_f64(r as f64 / u64::MAX as f64)
}

const CODES: [(Code, &str); 17] = [
    (Code::Ok, "OK"),
    (Code::Cancelled, "CANCELLED"),
    (Code::Unknown, "UNKNOWN"),
    (Code::InvalidArgument, "INVALID_ARGUMENT"),
    (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (Code::NotFound, "NOT_FOUND"),
    (Code::AlreadyExists, "ALREADY_EXISTS"),
    (Code::PermissionDenied, "PERMISSION_DENIED"),
    (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (Code::FailedPrecondition, "FAILED_PRECONDITION"),
    (Code::Aborted, "ABORTED"),
    (Code::OutOfRange, "OUT_OF_RANGE"),
    (Code::Unimplemented, "UNIMPLEMENTED"),
    (Code::Internal, "INTERNAL"),
    (Code::Unavailable, "UNAVAILABLE"),
    (Code::DataLoss, "DATA_LOSS"),
    (Code::Unauthenticated, "UNAUTHENTICATED"),
];

/// The canonical name of a status code, as service configs and other languages spell it.
pub fn code_name(code: Code) -> &'static str {
    CODES.iter().find(|(c, _)| *c == code).map_or("UNKNOWN", |(_, n)| n)
}

fn code_from_name(name: &str) -> Option<Code> {
    CODES.iter().find(|(_, n)| *n == name).map(|(c, _)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = include_str!("../../service_config.json");

    #[test]
    fn method_entry_wins_over_service_entry() {
        let config = ServiceConfig::from_json(CONFIG).unwrap();
        let login = config.method("/sysdesign.identity.v1.IdentityService/Login");
        let policy = login.retry.expect("Login is safe to retry");
        assert_eq!(policy.max_attempts, 4);
        assert_eq!(policy.initial_backoff, Duration::from_millis(200));
        assert_eq!(policy.max_backoff, Duration::from_secs(2));
        assert_eq!(policy.retryable, vec![Code::Unavailable]);
        let register = config.method("/sysdesign.identity.v1.IdentityService/RegisterUser");
        assert!(register.retry.is_none());
        assert_eq!(register.timeout, Some(Duration::from_secs(10)));
        assert!(config.method("/sysdesign.feed.v1.TimelineService/GetHomeTimeline").retry.is_some());
        assert!(config.method("/sysdesign.chat.v1.ChatService/Connect").timeout.is_none());
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn retries_unavailable_only_up_to_max_attempts() {
        let config =
            ServiceConfig::from_json(CONFIG).unwrap().method("/sysdesign.feed.v1.GraphService/FollowUser");
        let mut tries = 0;
        let result: Result<Response<()>, _> = call(
            &config,
            || Request::new(()),
            |_| {
                tries += 1;
                async { Err(Status::unavailable("down")) }
            },
        )
        .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(tries, 4);

        let mut tries = 0;
        let result: Result<Response<()>, _> = call(
            &config,
            || Request::new(()),
            |_| {
                tries += 1;
                async { Err(Status::not_found("gone")) }
            },
        )
        .await;
        assert_eq!(result.unwrap_err().code(), Code::NotFound);
        assert_eq!(tries, 1);
    }
}
