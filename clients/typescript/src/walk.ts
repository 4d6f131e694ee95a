/**
 * The client walk in TypeScript, through @grpc/grpc-js and the ts-proto stubs
 * generated from protos/ (see clients/README.md for the steps, the variables
 * and the summary; clients/python/walk.py is the reference).
 *
 * Register and log in, shorten and resolve a link, follow a user and read the
 * home timeline page by page, exchange chat messages over the `Connect`
 * stream (with receipts), upload a file through the `Upload` stream and
 * resume it once, and read the `google.rpc.BadRequest` details of refused
 * requests: one the client's own check refuses before sending (every request
 * is checked against the rules its proto declares, src/validate.ts), one only
 * the server refuses. The summary goes to stdout as one JSON line; progress to
 * stderr.
 */

import { createHash } from "node:crypto";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { basename } from "node:path";

import {
  type CallOptions,
  type ChannelOptions,
  type ClientUnaryCall,
  credentials,
  Metadata,
  type ServiceError,
  status,
} from "@grpc/grpc-js";

import { BadRequest } from "./gen/google/rpc/error_details";
import { Status } from "./gen/google/rpc/status";
import {
  ChatServiceClient,
  ClientEvent,
  ConversationType,
  CreateConversationRequest,
  ReceiptStatus,
  type ServerEvent,
} from "./gen/sysdesign/chat/v1/chat";
import {
  CreatePostRequest,
  FollowUserRequest,
  GetHomeTimelineRequest,
  GraphServiceClient,
  type Post,
  PostServiceClient,
  TimelineServiceClient,
} from "./gen/sysdesign/feed/v1/feed";
import { IdentityServiceClient, LoginRequest, RegisterUserRequest } from "./gen/sysdesign/identity/v1/identity";
import {
  CreateUploadRequest,
  GetUploadRequest,
  MediaServiceClient,
  UploadRequest,
  type UploadResponse,
} from "./gen/sysdesign/media/v1/media";
import {
  CreateShortUrlRequest,
  GetShortUrlRequest,
  ResolveShortUrlRequest,
  ShortenerServiceClient,
} from "./gen/sysdesign/shortener/v1/shortener";
import { checkRequests, refusedLocally } from "./validate";

const BAD_REQUEST_TYPE = "google.rpc.BadRequest";
const CHAT_TIMEOUT_MS = 60_000;

function say(msg: string): void {
  process.stderr.write(`· ${msg}\n`);
}

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

/** The full (last) overload every generated unary method has. */
type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/** A unary call as a promise; deadlines and retries come from the channel's service config. */
function unary<Req, Res>(method: UnaryMethod<Req, Res>, request: Req, metadata: Metadata): Promise<Res> {
  return new Promise((resolve, reject) => {
    method(request, metadata, {}, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

function isServiceError(err: unknown): err is ServiceError {
  return err instanceof Error && typeof (err as Partial<ServiceError>).code === "number";
}

/** Channel options: the shared retry policy (clients/service_config.json) as the default service config. */
function channelOptions(): ChannelOptions {
  const path = process.env.SYSDESIGN_SERVICE_CONFIG;
  if (!path) return {};
  return {
    "grpc.service_config": readFileSync(path, "utf8"),
    "grpc.enable_retries": 1,
    // The file is the policy: no service config from DNS TXT records.
    "grpc.service_config_disable_resolution": 1,
  };
}

/** The field names of every google.rpc.BadRequest in the error's `grpc-status-details-bin` trailer. */
function badRequestFields(err: ServiceError): string[] {
  const fields: string[] = [];
  for (const value of err.metadata.get("grpc-status-details-bin")) {
    const st = Status.decode(typeof value === "string" ? Buffer.from(value, "base64") : value);
    for (const detail of st.details) {
      if (detail.typeUrl.slice(detail.typeUrl.lastIndexOf("/") + 1) === BAD_REQUEST_TYPE) {
        fields.push(...BadRequest.decode(detail.value).fieldViolations.map((v) => v.field));
      }
    }
  }
  return fields;
}

async function main(): Promise<void> {
  const username = env("SYSDESIGN_WALK_USERNAME");
  const password = env("SYSDESIGN_WALK_PASSWORD");
  const peerName = env("SYSDESIGN_WALK_PEER");
  const uploadPath = env("SYSDESIGN_WALK_FILE");
  const addr = process.env.SYSDESIGN_GRPC_ADDR || "127.0.0.1:50051";
  const out: Record<string, unknown> = { username };

  const creds = credentials.createInsecure();
  // Every call's request messages are checked before they are sent.
  const interceptors = [checkRequests];
  const ids = new IdentityServiceClient(addr, creds, { ...channelOptions(), interceptors });
  // Every client shares the first one's channel.
  const shared = { channelOverride: ids.getChannel(), interceptors };
  const links = new ShortenerServiceClient(addr, creds, shared);
  const graph = new GraphServiceClient(addr, creds, shared);
  const posts = new PostServiceClient(addr, creds, shared);
  const timeline = new TimelineServiceClient(addr, creds, shared);
  const chats = new ChatServiceClient(addr, creds, shared);
  const files = new MediaServiceClient(addr, creds, shared);

  try {
    // 1. Register, then log in for a bearer token.
    const anonymous = new Metadata();
    const registered = await unary(
      ids.registerUser.bind(ids),
      RegisterUserRequest.create({ username, password }),
      anonymous,
    );
    const login = await unary(ids.login.bind(ids), LoginRequest.create({ username, password }), anonymous);
    const userId = registered.user?.userId ?? "";
    const md = new Metadata();
    md.set("authorization", `Bearer ${login.accessToken}`);
    out.user_id = userId;
    say(`registered ${username} (${userId})`);

    // 2. Shorten a link and resolve it.
    const longUrl = `https://example.com/walk/${username}`;
    const short = (await unary(links.createShortUrl.bind(links), CreateShortUrlRequest.create({ longUrl }), md))
      .shortUrl;
    const code = short?.code ?? "";
    const resolved = await unary(links.resolveShortUrl.bind(links), ResolveShortUrlRequest.create({ code }), md);
    Object.assign(out, { short_code: code, long_url: longUrl, resolved_url: resolved.longUrl });
    say(`${short?.shortUrl} -> ${resolved.longUrl}`);

    // 3. Follow the peer, post, and read the home timeline two posts a page.
    await unary(
      graph.followUser.bind(graph),
      FollowUserRequest.create({ user: { user: { $case: "username", value: peerName } } }),
      md,
    );
    const created = await unary(
      posts.createPost.bind(posts),
      CreatePostRequest.create({ text: `hello from ${username}` }),
      md,
    );
    out.post_id = created.post?.postId ?? "";
    const seen: Post[] = [];
    let pageToken = "";
    let pages = 0;
    do {
      const page = await unary(
        timeline.getHomeTimeline.bind(timeline),
        GetHomeTimelineRequest.create({ pageSize: 2, pageToken }),
        md,
      );
      seen.push(...page.posts);
      pages += 1;
      pageToken = page.nextPageToken;
    } while (pageToken);
    Object.assign(out, {
      timeline_post_ids: seen.map((p) => p.postId),
      timeline_pages: pages,
      peer_post_ids: seen.filter((p) => p.authorUsername === peerName).map((p) => p.postId),
    });
    say(`home timeline: ${seen.length} posts in ${pages} pages`);

    // 4. Chat: a direct conversation, one message over Connect, the echo and the read receipt.
    const conv = (
      await unary(
        chats.createConversation.bind(chats),
        CreateConversationRequest.create({
          type: ConversationType.CONVERSATION_TYPE_DIRECT,
          memberUsernames: [peerName],
        }),
        md,
      )
    ).conversation;
    const conversationId = conv?.conversationId ?? "";
    const text = `hello from ${username}`;
    let sentId = "";
    let echo = "";
    let readUpTo = "";
    const stream = chats.connect(md);
    const send = (event: ClientEvent["event"]): void => {
      stream.write(ClientEvent.create({ event }));
    };
    const giveUp = setTimeout(() => stream.cancel(), CHAT_TIMEOUT_MS);
    send({ $case: "hello", value: { deviceId: "walk-typescript" } });
    try {
      for await (const ev of stream as AsyncIterable<ServerEvent>) {
        const e = ev.event;
        if (e?.$case === "synced") {
          send({
            $case: "send",
            value: { clientMessageId: "walk-1", conversationId, text, attachmentId: "" },
          });
        } else if (e?.$case === "sendAck") {
          sentId = e.value.message?.messageId ?? "";
        } else if (e?.$case === "message" && e.value.senderUsername === peerName) {
          echo = e.value.text;
          send({ $case: "markRead", value: { conversationId, upToMessageId: e.value.messageId } });
        } else if (
          e?.$case === "receipt" &&
          e.value.userId !== userId &&
          e.value.status === ReceiptStatus.RECEIPT_STATUS_READ
        ) {
          readUpTo = e.value.upToMessageId;
        }
        // Message ids are Snowflake ids (decimal int64): a receipt covers every id up to its own.
        if (sentId && echo && readUpTo && BigInt(readUpTo) >= BigInt(sentId)) break;
      }
    } catch (err) {
      if (!(isServiceError(err) && err.code === status.CANCELLED)) throw err;
      say("chat: gave up waiting");
    } finally {
      clearTimeout(giveUp);
      stream.on("error", () => {}); // the CANCELLED that cancel() causes
      stream.cancel();
    }
    Object.assign(out, {
      conversation_id: conversationId,
      sent_text: text,
      sent_message_id: sentId,
      echo_text: echo,
      read_up_to: readUpTo,
    });
    say(`chat: sent ${sentId}, got ${JSON.stringify(echo)}, read up to ${readUpTo}`);

    // 5. Upload in two streams: the first stops halfway, the second resumes at the committed offset.
    const data = readFileSync(uploadPath);
    const upload = (
      await unary(
        files.createUpload.bind(files),
        CreateUploadRequest.create({
          filename: basename(uploadPath),
          contentType: "image/png",
          sizeBytes: data.length,
          sha256: createHash("sha256").update(data).digest("hex"),
        }),
        md,
      )
    ).upload;
    const uploadId = upload?.uploadId ?? "";
    const chunk = upload?.chunkSizeHint || 1 << 20;

    const sendRange = (start: number, stop: number): Promise<UploadResponse> =>
      new Promise((resolve, reject) => {
        const call = files.upload(md, (error, response) => (error ? reject(error) : resolve(response)));
        void (async () => {
          for (let off = start; off < stop; off += chunk) {
            const piece = data.subarray(off, Math.min(off + chunk, stop));
            if (!call.write(UploadRequest.create({ uploadId, offset: off, data: piece }))) await once(call, "drain");
          }
          call.end();
        })().catch(reject);
      });

    await sendRange(0, Math.floor(data.length / 2)); // the stream ends early, as a dropped connection would
    const committed =
      (await unary(files.getUpload.bind(files), GetUploadRequest.create({ uploadId }), md)).upload?.committedBytes ?? 0;
    const done = (await sendRange(committed, data.length)).upload;
    Object.assign(out, { upload_id: uploadId, resumed_from: committed, committed_bytes: done?.committedBytes ?? 0 });
    say(`upload: resumed at ${committed}, ${done?.committedBytes}/${data.length} bytes stored`);

    // 6. Refused requests: INVALID_ARGUMENT with google.rpc.BadRequest field violations.
    // First one that breaks a rule its proto declares (code: base62_code): the local check refuses it,
    // so it is never sent.
    try {
      await unary(links.getShortUrl.bind(links), GetShortUrlRequest.create({ code: "not base62!" }), md);
      throw new Error("a bad code was accepted");
    } catch (err) {
      if (!isServiceError(err)) throw err;
      if (!refusedLocally(err)) throw new Error(`the bad code reached the server: ${err.message}`);
      const fields = badRequestFields(err);
      Object.assign(out, { local_check_code: status[err.code], local_check_fields: fields, local_check: err.details });
      say(`refused before sending: ${status[err.code]} ${JSON.stringify(fields)} (${err.details})`);
    }
    // Then one that keeps the declared rules (long_url is required and at most 2048 characters) but is no
    // http(s) URL, which only the server checks.
    try {
      await unary(links.createShortUrl.bind(links), CreateShortUrlRequest.create({ longUrl: "not a url" }), md);
      throw new Error("a bad long_url was accepted");
    } catch (err) {
      if (!isServiceError(err)) throw err;
      if (refusedLocally(err)) throw new Error(`the local check refused a request it should let through: ${err.message}`);
      const fields = badRequestFields(err);
      const codeName = status[err.code];
      Object.assign(out, { bad_request_code: codeName, bad_request_fields: fields });
      say(`bad request: ${codeName} ${JSON.stringify(fields)}`);
    }

    process.stdout.write(`${JSON.stringify(out)}\n`);
  } finally {
    ids.close(); // closes the shared channel
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`walk failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exitCode = 1;
});
