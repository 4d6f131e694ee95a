package io.sysdesign.walk;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.reflect.TypeToken;
import com.google.protobuf.Any;
import com.google.protobuf.ByteString;
import com.google.rpc.BadRequest;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import io.grpc.stub.StreamObserver;
import io.sysdesign.chat.v1.ChatServiceGrpc;
import io.sysdesign.chat.v1.ClientEvent;
import io.sysdesign.chat.v1.Conversation;
import io.sysdesign.chat.v1.ConversationType;
import io.sysdesign.chat.v1.CreateConversationRequest;
import io.sysdesign.chat.v1.Hello;
import io.sysdesign.chat.v1.MarkReadEvent;
import io.sysdesign.chat.v1.ReceiptStatus;
import io.sysdesign.chat.v1.SendEvent;
import io.sysdesign.chat.v1.ServerEvent;
import io.sysdesign.feed.v1.CreatePostRequest;
import io.sysdesign.feed.v1.FollowUserRequest;
import io.sysdesign.feed.v1.GetHomeTimelineRequest;
import io.sysdesign.feed.v1.GetHomeTimelineResponse;
import io.sysdesign.feed.v1.GraphServiceGrpc;
import io.sysdesign.feed.v1.Post;
import io.sysdesign.feed.v1.PostServiceGrpc;
import io.sysdesign.feed.v1.TimelineServiceGrpc;
import io.sysdesign.feed.v1.UserRef;
import io.sysdesign.identity.v1.IdentityServiceGrpc;
import io.sysdesign.identity.v1.LoginRequest;
import io.sysdesign.identity.v1.RegisterUserRequest;
import io.sysdesign.identity.v1.User;
import io.sysdesign.media.v1.CreateUploadRequest;
import io.sysdesign.media.v1.GetUploadRequest;
import io.sysdesign.media.v1.MediaServiceGrpc;
import io.sysdesign.media.v1.Upload;
import io.sysdesign.media.v1.UploadRequest;
import io.sysdesign.media.v1.UploadResponse;
import io.sysdesign.shortener.v1.CreateShortUrlRequest;
import io.sysdesign.shortener.v1.ResolveShortUrlRequest;
import io.sysdesign.shortener.v1.ShortUrl;
import io.sysdesign.shortener.v1.ShortenerServiceGrpc;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.PrintStream;
import java.io.Reader;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

/**
 * The client walk in Java (clients/README.md), through the grpc-java stubs generated from
 * {@code protos/} only: register and log in, shorten and resolve a link, follow a user and read
 * the home timeline page by page, exchange chat messages over the {@code Connect} stream (with
 * receipts), upload a file through the {@code Upload} stream and resume it once, and read the
 * {@code google.rpc.BadRequest} details of a refused request. The summary goes to stdout as one
 * JSON line; progress goes to stderr.
 */
public final class Walk {
  private static final Duration CHAT_WAIT = Duration.ofSeconds(60);
  private static final Duration STREAM_DEADLINE = Duration.ofSeconds(120);

  private static final PrintStream OUT =
      new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);
  private static final PrintStream ERR =
      new PrintStream(new FileOutputStream(FileDescriptor.err), true, StandardCharsets.UTF_8);

  private final String username;
  private final String password;
  private final String peerName;
  private final Path uploadPath;
  private final ManagedChannel channel;
  private final JsonObject out = new JsonObject();

  private Walk(String username, String password, String peerName, Path uploadPath,
      ManagedChannel channel) {
    this.username = username;
    this.password = password;
    this.peerName = peerName;
    this.uploadPath = uploadPath;
    this.channel = channel;
  }

  public static void main(String[] args) throws Exception {
    ManagedChannel channel = openChannel();
    try {
      Walk walk = new Walk(env("SYSDESIGN_WALK_USERNAME"), env("SYSDESIGN_WALK_PASSWORD"),
          env("SYSDESIGN_WALK_PEER"), Path.of(env("SYSDESIGN_WALK_FILE")), channel);
      OUT.println(new GsonBuilder().disableHtmlEscaping().create().toJson(walk.run()));
    } finally {
      channel.shutdown();
      if (!channel.awaitTermination(5, TimeUnit.SECONDS)) {
        channel.shutdownNow();
      }
    }
  }

  private static String env(String name) {
    String value = System.getenv(name);
    if (value == null || value.isEmpty()) {
      throw new IllegalStateException(name + " is not set");
    }
    return value;
  }

  private static void say(String msg) {
    ERR.println("· " + msg);
  }

  /** A plaintext channel to SYSDESIGN_GRPC_ADDR with the shared retry policy as its default service config. */
  static ManagedChannel openChannel() throws IOException {
    String addr = System.getenv().getOrDefault("SYSDESIGN_GRPC_ADDR", "127.0.0.1:50051");
    ManagedChannelBuilder<?> builder = ManagedChannelBuilder.forTarget(addr).usePlaintext();
    String config = System.getenv("SYSDESIGN_SERVICE_CONFIG");
    if (config != null && !config.isEmpty()) { // clients/service_config.json
      builder.defaultServiceConfig(readServiceConfig(Path.of(config))).enableRetry();
    }
    return builder.build();
  }

  /** The service config as grpc-java takes it: maps, lists, strings, doubles and booleans. */
  static Map<String, ?> readServiceConfig(Path path) throws IOException {
    try (Reader reader = Files.newBufferedReader(path, StandardCharsets.UTF_8)) {
      return new Gson().fromJson(reader, new TypeToken<Map<String, Object>>() {}.getType());
    }
  }

  private JsonObject run() throws Exception {
    out.addProperty("username", username);

    // 1. Register, then log in for a bearer token.
    IdentityServiceGrpc.IdentityServiceBlockingStub ids = IdentityServiceGrpc.newBlockingStub(channel);
    User user = ids.registerUser(RegisterUserRequest.newBuilder()
        .setUsername(username).setPassword(password).build()).getUser();
    String token = ids.login(LoginRequest.newBuilder()
        .setUsername(username).setPassword(password).build()).getAccessToken();
    BearerToken auth = new BearerToken(token);
    out.addProperty("user_id", user.getUserId());
    say("registered " + username + " (" + user.getUserId() + ")");

    ShortenerServiceGrpc.ShortenerServiceBlockingStub links =
        ShortenerServiceGrpc.newBlockingStub(channel).withCallCredentials(auth);
    shorten(links);
    readTimeline(auth);
    chat(auth, user.getUserId());
    upload(auth);
    badRequest(links);
    return out;
  }

  /** 2. Shorten a link and resolve it. */
  private void shorten(ShortenerServiceGrpc.ShortenerServiceBlockingStub links) {
    String longUrl = "https://example.com/walk/" + username;
    ShortUrl shortUrl = links.createShortUrl(
        CreateShortUrlRequest.newBuilder().setLongUrl(longUrl).build()).getShortUrl();
    String resolved = links.resolveShortUrl(
        ResolveShortUrlRequest.newBuilder().setCode(shortUrl.getCode()).build()).getLongUrl();
    out.addProperty("short_code", shortUrl.getCode());
    out.addProperty("long_url", longUrl);
    out.addProperty("resolved_url", resolved);
    say(shortUrl.getShortUrl() + " -> " + resolved);
  }

  /** 3. Follow the peer, post, and read the home timeline two posts a page. */
  private void readTimeline(BearerToken auth) {
    GraphServiceGrpc.newBlockingStub(channel).withCallCredentials(auth).followUser(
        FollowUserRequest.newBuilder().setUser(UserRef.newBuilder().setUsername(peerName)).build());
    String postId = PostServiceGrpc.newBlockingStub(channel).withCallCredentials(auth).createPost(
        CreatePostRequest.newBuilder().setText("hello from " + username).build()).getPost().getPostId();
    out.addProperty("post_id", postId);

    TimelineServiceGrpc.TimelineServiceBlockingStub timeline =
        TimelineServiceGrpc.newBlockingStub(channel).withCallCredentials(auth);
    List<Post> seen = new ArrayList<>();
    String pageToken = "";
    int pages = 0;
    do {
      GetHomeTimelineResponse page = timeline.getHomeTimeline(
          GetHomeTimelineRequest.newBuilder().setPageSize(2).setPageToken(pageToken).build());
      seen.addAll(page.getPostsList());
      pages++;
      pageToken = page.getNextPageToken();
    } while (!pageToken.isEmpty());

    JsonArray all = new JsonArray();
    JsonArray peers = new JsonArray();
    for (Post post : seen) {
      all.add(post.getPostId());
      if (post.getAuthorUsername().equals(peerName)) {
        peers.add(post.getPostId());
      }
    }
    out.add("timeline_post_ids", all);
    out.addProperty("timeline_pages", pages);
    out.add("peer_post_ids", peers);
    say("home timeline: " + seen.size() + " posts in " + pages + " pages");
  }

  /** 4. Chat: a direct conversation, one message over Connect, the echo and the read receipt. */
  private void chat(BearerToken auth, String myUserId) throws InterruptedException {
    ChatServiceGrpc.ChatServiceBlockingStub chats =
        ChatServiceGrpc.newBlockingStub(channel).withCallCredentials(auth);
    Conversation conv = chats.createConversation(CreateConversationRequest.newBuilder()
        .setType(ConversationType.CONVERSATION_TYPE_DIRECT).addMemberUsernames(peerName).build())
        .getConversation();
    String convId = conv.getConversationId();

    ChatStream stream = new ChatStream();
    StreamObserver<ClientEvent> outbox = ChatServiceGrpc.newStub(channel).withCallCredentials(auth)
        .withDeadlineAfter(STREAM_DEADLINE.toMillis(), TimeUnit.MILLISECONDS).connect(stream);
    outbox.onNext(ClientEvent.newBuilder()
        .setHello(Hello.newBuilder().setDeviceId("walk-java")).build());

    String text = "hello from " + username;
    String sentId = "";
    String echo = "";
    String readUpTo = "";
    long deadline = System.nanoTime() + CHAT_WAIT.toNanos();
    while (!(sentId.length() > 0 && echo.length() > 0 && atOrAfter(readUpTo, sentId))) {
      long left = deadline - System.nanoTime();
      ServerEvent ev = left > 0 ? stream.events.poll(left, TimeUnit.NANOSECONDS) : null;
      if (ev == null) {
        break; // the time is up: the summary shows what is missing
      }
      switch (ev.getEventCase()) {
        case SYNCED -> outbox.onNext(ClientEvent.newBuilder().setSend(SendEvent.newBuilder()
            .setClientMessageId("walk-1").setConversationId(convId).setText(text)).build());
        case SEND_ACK -> sentId = ev.getSendAck().getMessage().getMessageId();
        case MESSAGE -> {
          var msg = ev.getMessage();
          if (msg.getSenderUsername().equals(peerName) && msg.getConversationId().equals(convId)) {
            echo = msg.getText();
            outbox.onNext(ClientEvent.newBuilder().setMarkRead(MarkReadEvent.newBuilder()
                .setConversationId(convId).setUpToMessageId(msg.getMessageId())).build());
          }
        }
        case RECEIPT -> {
          var receipt = ev.getReceipt();
          if (!receipt.getUserId().equals(myUserId)
              && receipt.getStatus() == ReceiptStatus.RECEIPT_STATUS_READ) {
            readUpTo = receipt.getUpToMessageId();
          }
        }
        case ERROR -> say("chat event error: " + ev.getError().getCode() + " " + ev.getError().getMessage());
        case EVENT_NOT_SET -> throw stream.failure(); // the stream ended before the walk did
        default -> { } // presence, typing, heartbeats
      }
    }
    outbox.onCompleted();
    stream.cancel();
    out.addProperty("conversation_id", convId);
    out.addProperty("sent_text", text);
    out.addProperty("sent_message_id", sentId);
    out.addProperty("echo_text", echo);
    out.addProperty("read_up_to", readUpTo);
    say("chat: sent " + sentId + ", got '" + echo + "', read up to " + readUpTo);
  }

  /** Message ids are decimal Snowflake ids: compare them as numbers. */
  private static boolean atOrAfter(String id, String other) {
    if (id.isEmpty() || other.isEmpty()) {
      return false;
    }
    return new BigInteger(id).compareTo(new BigInteger(other)) >= 0;
  }

  /** The events of one Connect stream, handed from grpc's threads to the walk's. */
  private static final class ChatStream implements ClientResponseObserver<ClientEvent, ServerEvent> {
    /** An event with nothing set marks the end of the stream. */
    final BlockingQueue<ServerEvent> events = new LinkedBlockingQueue<>();
    private volatile ClientCallStreamObserver<ClientEvent> call;
    private volatile Throwable error;

    @Override
    public void beforeStart(ClientCallStreamObserver<ClientEvent> requestStream) {
      call = requestStream;
    }

    @Override
    public void onNext(ServerEvent event) {
      events.add(event);
    }

    @Override
    public void onError(Throwable t) {
      error = t;
      events.add(ServerEvent.getDefaultInstance());
    }

    @Override
    public void onCompleted() {
      events.add(ServerEvent.getDefaultInstance());
    }

    RuntimeException failure() {
      Throwable t = error;
      return t instanceof RuntimeException r ? r
          : new IllegalStateException("the chat stream ended early", t);
    }

    void cancel() {
      call.cancel("the walk is done", null);
    }
  }

  /** 5. Upload in two streams: the first stops halfway, the second resumes at the committed offset. */
  private void upload(BearerToken auth) throws Exception {
    byte[] data = Files.readAllBytes(uploadPath);
    MediaServiceGrpc.MediaServiceBlockingStub files =
        MediaServiceGrpc.newBlockingStub(channel).withCallCredentials(auth);
    Upload up = files.createUpload(CreateUploadRequest.newBuilder()
        .setFilename(uploadPath.getFileName().toString()).setContentType("image/png")
        .setSizeBytes(data.length).setSha256(sha256Hex(data)).build()).getUpload();
    int chunk = up.getChunkSizeHint() > 0 ? (int) up.getChunkSizeHint() : 1 << 20;
    MediaServiceGrpc.MediaServiceStub streams = MediaServiceGrpc.newStub(channel).withCallCredentials(auth);

    // The first stream ends early, as a dropped connection would.
    sendChunks(streams, up.getUploadId(), data, 0, data.length / 2, chunk);
    long committed = files.getUpload(GetUploadRequest.newBuilder().setUploadId(up.getUploadId()).build())
        .getUpload().getCommittedBytes();
    Upload done = sendChunks(streams, up.getUploadId(), data, (int) committed, data.length, chunk);
    out.addProperty("upload_id", up.getUploadId());
    out.addProperty("resumed_from", committed);
    out.addProperty("committed_bytes", done.getCommittedBytes());
    say("upload: resumed at " + committed + ", " + done.getCommittedBytes() + "/" + data.length
        + " bytes stored");
  }

  /** One Upload stream carrying data[start, stop) in chunks; returns the server's answer. */
  private static Upload sendChunks(MediaServiceGrpc.MediaServiceStub streams, String uploadId,
      byte[] data, int start, int stop, int chunk) throws Exception {
    CompletableFuture<UploadResponse> answer = new CompletableFuture<>();
    StreamObserver<UploadRequest> requests = streams
        .withDeadlineAfter(STREAM_DEADLINE.toMillis(), TimeUnit.MILLISECONDS)
        .upload(new StreamObserver<>() {
          @Override
          public void onNext(UploadResponse response) {
            answer.complete(response);
          }

          @Override
          public void onError(Throwable t) {
            answer.completeExceptionally(t);
          }

          @Override
          public void onCompleted() {
            answer.completeExceptionally(new IllegalStateException("Upload ended with no answer"));
          }
        });
    for (int off = start; off < stop; off += chunk) {
      requests.onNext(UploadRequest.newBuilder().setUploadId(uploadId).setOffset(off)
          .setData(ByteString.copyFrom(data, off, Math.min(chunk, stop - off))).build());
    }
    requests.onCompleted();
    return answer.get().getUpload();
  }

  private static String sha256Hex(byte[] data) throws NoSuchAlgorithmException {
    return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(data));
  }

  /** 6. A refused request: INVALID_ARGUMENT with google.rpc.BadRequest field violations. */
  private void badRequest(ShortenerServiceGrpc.ShortenerServiceBlockingStub links) throws Exception {
    try {
      links.createShortUrl(CreateShortUrlRequest.newBuilder().setLongUrl("not a url").build());
      throw new IllegalStateException("a bad long_url was accepted");
    } catch (StatusRuntimeException err) {
      JsonArray fields = new JsonArray();
      com.google.rpc.Status status = StatusProto.fromThrowable(err); // grpc-status-details-bin
      if (status != null) {
        for (Any detail : status.getDetailsList()) {
          if (detail.is(BadRequest.class)) {
            detail.unpack(BadRequest.class).getFieldViolationsList().forEach(v -> fields.add(v.getField()));
          }
        }
      }
      Status.Code code = err.getStatus().getCode();
      out.addProperty("bad_request_code", code.name());
      out.add("bad_request_fields", fields);
      say("bad request: " + code.name() + " " + fields);
    }
  }
}
