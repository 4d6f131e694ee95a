//! The client walk in Rust (see `clients/README.md`), through tonic stubs
//! generated from `protos/` at build time.
//!
//! Register and log in, shorten and resolve a link, follow a user and read
//! the home timeline page by page, exchange chat messages over the `Connect`
//! stream (with receipts), upload a file through the `Upload` stream and
//! resume it once, and read the `google.rpc.BadRequest` details of a refused
//! request. The summary goes to stdout as one JSON line; progress to stderr.
//!
//! ```sh
//! SYSDESIGN_WALK_USERNAME=ada SYSDESIGN_WALK_PASSWORD=correct-horse-9 \
//! SYSDESIGN_WALK_PEER=bob SYSDESIGN_WALK_FILE=photo.png \
//! SYSDESIGN_SERVICE_CONFIG=clients/service_config.json \
//! clients/rust/target/release/walk
//! ```

mod retry;

use std::error::Error;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_types::StatusExt;

use retry::{ServiceConfig, code_name};

pub mod pb {
    pub mod identity {
        tonic::include_proto!("sysdesign.identity.v1");
    }
    pub mod shortener {
        tonic::include_proto!("sysdesign.shortener.v1");
    }
    pub mod feed {
        tonic::include_proto!("sysdesign.feed.v1");
    }
    pub mod chat {
        tonic::include_proto!("sysdesign.chat.v1");
    }
    pub mod media {
        tonic::include_proto!("sysdesign.media.v1");
    }
}

use pb::chat::{self, chat_service_client::ChatServiceClient, client_event, server_event};
use pb::feed::timeline_service_client::TimelineServiceClient;
use pb::feed::{self, graph_service_client::GraphServiceClient, post_service_client::PostServiceClient};
use pb::identity::{self, identity_service_client::IdentityServiceClient};
use pb::media::{self, media_service_client::MediaServiceClient};
use pb::shortener::{self, shortener_service_client::ShortenerServiceClient};

type BoxError = Box<dyn Error>;

fn say(msg: impl AsRef<str>) {
    eprintln!("· {}", msg.as_ref());
}

fn env(name: &str) -> Result<String, BoxError> {
    std::env::var(name).map_err(|_| format!("{name} is not set").into())
}

/// What every call carries: the retry policy and, once logged in, the bearer token.
struct Session {
    config: ServiceConfig,
    token: Option<AsciiMetadataValue>,
}

impl Session {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("authorization", token.clone());
        }
        request
    }

    /// One unary call under the service config entry of `method`
    /// (`/pkg.Service/Method`): `call` gets a clone of `client` and a fresh
    /// request for every attempt.
    async fn unary<C, Req, Resp, Fut>(
        &self,
        client: &C,
        method: &str,
        message: Req,
        mut call: impl FnMut(C, Request<Req>) -> Fut,
    ) -> Result<Resp, Status>
    where
        C: Clone,
        Req: Clone,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let config = self.config.method(method);
        retry::call(&config, || self.request(message.clone()), |r| call(client.clone(), r))
            .await
            .map(Response::into_inner)
    }
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("walk: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(walk()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            match err.downcast_ref::<Status>() {
                Some(status) => eprintln!("walk failed: {} {}", code_name(status.code()), status.message()),
                None => eprintln!("walk failed: {err}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn walk() -> Result<(), BoxError> {
    let username = env("SYSDESIGN_WALK_USERNAME")?;
    let password = env("SYSDESIGN_WALK_PASSWORD")?;
    let peer_name = env("SYSDESIGN_WALK_PEER")?;
    let upload_path = env("SYSDESIGN_WALK_FILE")?;
    let addr = std::env::var("SYSDESIGN_GRPC_ADDR").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let config = match std::env::var("SYSDESIGN_SERVICE_CONFIG") {
        // The shared retry policy (clients/service_config.json).
        Ok(path) => {
            ServiceConfig::from_json(&std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?)?
        }
        Err(_) => ServiceConfig::default(),
    };
    // Lazy, like every gRPC channel: a stack that is not up yet answers UNAVAILABLE, which the policy retries.
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(10))
        .connect_lazy();
    let mut s = Session { config, token: None };

    // 1. Register, then log in for a bearer token.
    let ids = IdentityServiceClient::new(channel.clone());
    let user = s
        .unary(
            &ids,
            "/sysdesign.identity.v1.IdentityService/RegisterUser",
            identity::RegisterUserRequest { username: username.clone(), password: password.clone() },
            |mut c, r| async move { c.register_user(r).await },
        )
        .await?
        .user
        .ok_or("RegisterUser returned no user")?;
    let login = s
        .unary(
            &ids,
            "/sysdesign.identity.v1.IdentityService/Login",
            identity::LoginRequest { username: username.clone(), password },
            |mut c, r| async move { c.login(r).await },
        )
        .await?;
    s.token = Some(MetadataValue::try_from(format!("Bearer {}", login.access_token))?);
    say(format!("registered {username} ({})", user.user_id));

    // 2. Shorten a link and resolve it.
    let links = ShortenerServiceClient::new(channel.clone());
    let long_url = format!("https://example.com/walk/{username}");
    let short = s
        .unary(
            &links,
            "/sysdesign.shortener.v1.ShortenerService/CreateShortUrl",
            shortener::CreateShortUrlRequest { long_url: long_url.clone(), ..Default::default() },
            |mut c, r| async move { c.create_short_url(r).await },
        )
        .await?
        .short_url
        .ok_or("CreateShortUrl returned no short_url")?;
    let resolved = s
        .unary(
            &links,
            "/sysdesign.shortener.v1.ShortenerService/ResolveShortUrl",
            shortener::ResolveShortUrlRequest { code: short.code.clone(), ..Default::default() },
            |mut c, r| async move { c.resolve_short_url(r).await },
        )
        .await?;
    say(format!("{} -> {}", short.short_url, resolved.long_url));

    // 3. Follow the peer, post, and read the home timeline two posts a page.
    let graph = GraphServiceClient::new(channel.clone());
    let peer_ref = feed::UserRef { user: Some(feed::user_ref::User::Username(peer_name.clone())) };
    s.unary(
        &graph,
        "/sysdesign.feed.v1.GraphService/FollowUser",
        feed::FollowUserRequest { user: Some(peer_ref) },
        |mut c, r| async move { c.follow_user(r).await },
    )
    .await?;
    let posts = PostServiceClient::new(channel.clone());
    let post = s
        .unary(
            &posts,
            "/sysdesign.feed.v1.PostService/CreatePost",
            feed::CreatePostRequest { text: format!("hello from {username}"), ..Default::default() },
            |mut c, r| async move { c.create_post(r).await },
        )
        .await?
        .post
        .ok_or("CreatePost returned no post")?;
    let timeline = TimelineServiceClient::new(channel.clone());
    let (mut seen, mut page_token, mut pages) = (Vec::<feed::Post>::new(), String::new(), 0);
    loop {
        let page = s
            .unary(
                &timeline,
                "/sysdesign.feed.v1.TimelineService/GetHomeTimeline",
                feed::GetHomeTimelineRequest { page_size: 2, page_token },
                |mut c, r| async move { c.get_home_timeline(r).await },
            )
            .await?;
        seen.extend(page.posts);
        pages += 1;
        page_token = page.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    let timeline_post_ids: Vec<&str> = seen.iter().map(|p| p.post_id.as_str()).collect();
    let peer_post_ids: Vec<&str> =
        seen.iter().filter(|p| p.author_username == peer_name).map(|p| p.post_id.as_str()).collect();
    say(format!("home timeline: {} posts in {pages} pages", seen.len()));

    // 4. Chat: a direct conversation, one message over Connect, the echo and the read receipt.
    let chats = ChatServiceClient::new(channel.clone());
    let conversation = s
        .unary(
            &chats,
            "/sysdesign.chat.v1.ChatService/CreateConversation",
            chat::CreateConversationRequest {
                r#type: chat::ConversationType::Direct.into(),
                member_usernames: vec![peer_name.clone()],
                ..Default::default()
            },
            |mut c, r| async move { c.create_conversation(r).await },
        )
        .await?
        .conversation
        .ok_or("CreateConversation returned no conversation")?;
    let conversation_id = conversation.conversation_id;
    let (outbox, outbound) = mpsc::channel(16);
    let send = |event| chat::ClientEvent { event: Some(event), ..Default::default() };
    outbox.send(send(client_event::Event::Hello(chat::Hello { device_id: "walk-rust".into() }))).await?;
    let mut inbound = chats.clone().connect(s.request(ReceiverStream::new(outbound))).await?.into_inner();
    let text = format!("hello from {username}");
    let (mut sent_id, mut echo, mut read_up_to) = (String::new(), String::new(), String::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(next) = timeout_at(deadline, inbound.message()).await {
        let Some(event) = next? else { break };
        match event.event {
            Some(server_event::Event::Synced(_)) => {
                outbox
                    .send(send(client_event::Event::Send(chat::SendEvent {
                        client_message_id: "walk-1".into(),
                        conversation_id: conversation_id.clone(),
                        text: text.clone(),
                        ..Default::default()
                    })))
                    .await?;
            }
            Some(server_event::Event::SendAck(ack)) => {
                sent_id = ack.message.map(|m| m.message_id).unwrap_or_default();
            }
            Some(server_event::Event::Message(m)) if m.sender_username == peer_name => {
                outbox
                    .send(send(client_event::Event::MarkRead(chat::MarkReadEvent {
                        conversation_id: conversation_id.clone(),
                        up_to_message_id: m.message_id,
                    })))
                    .await?;
                echo = m.text;
            }
            Some(server_event::Event::Receipt(r))
                if r.user_id != user.user_id && r.status == i32::from(chat::ReceiptStatus::Read) =>
            {
                read_up_to = r.up_to_message_id;
            }
            _ => {}
        }
        if !sent_id.is_empty() && !echo.is_empty() && id_at_least(&read_up_to, &sent_id) {
            break;
        }
    }
    // Closing the outbound side and dropping the response stream ends the call.
    drop(outbox);
    drop(inbound);
    say(format!("chat: sent {sent_id}, got {echo:?}, read up to {read_up_to}"));

    // 5. Upload in two streams: the first stops halfway, the second resumes at the committed offset.
    let data = std::fs::read(&upload_path).map_err(|e| format!("{upload_path}: {e}"))?;
    let files = MediaServiceClient::new(channel.clone());
    let filename = Path::new(&upload_path).file_name().and_then(|n| n.to_str()).unwrap_or("upload.png");
    let upload = s
        .unary(
            &files,
            "/sysdesign.media.v1.MediaService/CreateUpload",
            media::CreateUploadRequest {
                filename: filename.into(),
                content_type: "image/png".into(),
                size_bytes: data.len() as i64,
                sha256: format!("{:x}", Sha256::digest(&data)),
            },
            |mut c, r| async move { c.create_upload(r).await },
        )
        .await?
        .upload
        .ok_or("CreateUpload returned no upload")?;
    let chunk = usize::try_from(upload.chunk_size_hint).ok().filter(|&n| n > 0).unwrap_or(1 << 20);
    let chunks = |start: usize, stop: usize| {
        let messages: Vec<_> = (start..stop)
            .step_by(chunk)
            .map(|offset| media::UploadRequest {
                upload_id: upload.upload_id.clone(),
                offset: offset as i64,
                data: data[offset..stop.min(offset + chunk)].to_vec(),
            })
            .collect();
        tokio_stream::iter(messages)
    };
    // The first stream ends early, as a dropped connection would.
    files.clone().upload(s.request(chunks(0, data.len() / 2))).await?;
    let committed = s
        .unary(
            &files,
            "/sysdesign.media.v1.MediaService/GetUpload",
            media::GetUploadRequest { upload_id: upload.upload_id.clone() },
            |mut c, r| async move { c.get_upload(r).await },
        )
        .await?
        .upload
        .ok_or("GetUpload returned no upload")?
        .committed_bytes;
    let resume_at = usize::try_from(committed)?;
    let done = files
        .clone()
        .upload(s.request(chunks(resume_at, data.len())))
        .await?
        .into_inner()
        .upload
        .ok_or("Upload returned no upload")?;
    say(format!("upload: resumed at {committed}, {}/{} bytes stored", done.committed_bytes, data.len()));

    // 6. A refused request: INVALID_ARGUMENT with google.rpc.BadRequest field violations.
    let refused = s
        .unary(
            &links,
            "/sysdesign.shortener.v1.ShortenerService/CreateShortUrl",
            shortener::CreateShortUrlRequest { long_url: "not a url".into(), ..Default::default() },
            |mut c, r| async move { c.create_short_url(r).await },
        )
        .await;
    let Err(err) = refused else { return Err("a bad long_url was accepted".into()) };
    let bad_request_fields: Vec<String> = err
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    let bad_request_code = code_name(err.code());
    say(format!("bad request: {bad_request_code} {bad_request_fields:?}"));

    let summary = json!({
        "username": username,
        "user_id": user.user_id,
        "short_code": short.code,
        "long_url": long_url,
        "resolved_url": resolved.long_url,
        "post_id": post.post_id,
        "timeline_post_ids": timeline_post_ids,
        "timeline_pages": pages,
        "peer_post_ids": peer_post_ids,
        "conversation_id": conversation_id,
        "sent_text": text,
        "sent_message_id": sent_id,
        "echo_text": echo,
        "read_up_to": read_up_to,
        "upload_id": upload.upload_id,
        "resumed_from": committed,
        "committed_bytes": done.committed_bytes,
        "bad_request_code": bad_request_code,
        "bad_request_fields": bad_request_fields,
    });
    println!("{summary}");
    Ok(())
}

/// Message ids are decimal Snowflake ids: compare them as numbers.
fn id_at_least(id: &str, other: &str) -> bool {
    matches!((id.parse::<u64>(), other.parse::<u64>()), (Ok(a), Ok(b)) if a >= b)
}
