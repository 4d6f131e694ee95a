// Command walk takes the client walk of clients/README.md in Go, through the
// stubs generated from protos/ only: register and log in, shorten and resolve
// a link, follow a user and read the home timeline page by page, exchange chat
// messages over the Connect stream (with receipts), upload a file through the
// Upload stream and resume it once, and read the google.rpc.BadRequest details
// of a refused request.
//
// Input is environment variables (SYSDESIGN_GRPC_ADDR, SYSDESIGN_SERVICE_CONFIG,
// SYSDESIGN_WALK_USERNAME, SYSDESIGN_WALK_PASSWORD, SYSDESIGN_WALK_PEER,
// SYSDESIGN_WALK_FILE). Progress goes to stderr; the summary goes to stdout as
// one JSON line.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	chatv1 "github.com/sysdesign/sysdesign/clients/go/gen/sysdesign/chat/v1"
	feedv1 "github.com/sysdesign/sysdesign/clients/go/gen/sysdesign/feed/v1"
	identityv1 "github.com/sysdesign/sysdesign/clients/go/gen/sysdesign/identity/v1"
	mediav1 "github.com/sysdesign/sysdesign/clients/go/gen/sysdesign/media/v1"
	shortenerv1 "github.com/sysdesign/sysdesign/clients/go/gen/sysdesign/shortener/v1"
)

// chatWait bounds the chat step: the send, the peer's echo and its read receipt.
const chatWait = 60 * time.Second

// Summary is the JSON line the walk prints; the keys and their meanings are
// the same in every language (clients/README.md).
type Summary struct {
	Username         string   `json:"username"`
	UserID           string   `json:"user_id"`
	ShortCode        string   `json:"short_code"`
	LongURL          string   `json:"long_url"`
	ResolvedURL      string   `json:"resolved_url"`
	PostID           string   `json:"post_id"`
	TimelinePostIDs  []string `json:"timeline_post_ids"`
	TimelinePages    int      `json:"timeline_pages"`
	PeerPostIDs      []string `json:"peer_post_ids"`
	ConversationID   string   `json:"conversation_id"`
	SentText         string   `json:"sent_text"`
	SentMessageID    string   `json:"sent_message_id"`
	EchoText         string   `json:"echo_text"`
	ReadUpTo         string   `json:"read_up_to"`
	UploadID         string   `json:"upload_id"`
	ResumedFrom      int64    `json:"resumed_from"`
	CommittedBytes   int64    `json:"committed_bytes"`
	BadRequestCode   string   `json:"bad_request_code"`
	BadRequestFields []string `json:"bad_request_fields"`
}

type config struct {
	addr, serviceConfig            string
	username, password, peer, file string
}

func loadConfig() (config, error) {
	c := config{
		addr:          os.Getenv("SYSDESIGN_GRPC_ADDR"),
		serviceConfig: os.Getenv("SYSDESIGN_SERVICE_CONFIG"),
	}
	if c.addr == "" {
		c.addr = "127.0.0.1:50051"
	}
	for _, v := range []struct {
		name string
		dst  *string
	}{
		{"SYSDESIGN_WALK_USERNAME", &c.username},
		{"SYSDESIGN_WALK_PASSWORD", &c.password},
		{"SYSDESIGN_WALK_PEER", &c.peer},
		{"SYSDESIGN_WALK_FILE", &c.file},
	} {
		if *v.dst = os.Getenv(v.name); *v.dst == "" {
			return c, fmt.Errorf("%s is not set", v.name)
		}
	}
	return c, nil
}

func say(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "· "+format+"\n", args...)
}

// dial opens the channel; the shared service config carries the retry policy
// and the deadlines (grpc-go retries by default once a policy is configured).
func dial(c config) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if c.serviceConfig != "" {
		js, err := os.ReadFile(c.serviceConfig)
		if err != nil {
			return nil, fmt.Errorf("service config: %w", err)
		}
		opts = append(opts, grpc.WithDefaultServiceConfig(string(js)))
	}
	return grpc.NewClient(c.addr, opts...)
}

type walk struct {
	cfg    config
	conn   *grpc.ClientConn
	userID string
	out    Summary
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "walk: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	cfg, err := loadConfig()
	if err != nil {
		return err
	}
	conn, err := dial(cfg)
	if err != nil {
		return err
	}
	defer conn.Close()

	w := &walk{cfg: cfg, conn: conn, out: Summary{Username: cfg.username}}
	ctx, err = w.login(ctx)
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"shortener", w.shorten},
		{"feed", w.timeline},
		{"chat", w.chat},
		{"media", w.upload},
		{"bad request", w.badRequest},
	}
	for _, s := range steps {
		if err := s.fn(ctx); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return json.NewEncoder(os.Stdout).Encode(w.out)
}

// login registers the user and logs in; the returned context carries the bearer token.
func (w *walk) login(ctx context.Context) (context.Context, error) {
	ids := identityv1.NewIdentityServiceClient(w.conn)
	reg, err := ids.RegisterUser(ctx, &identityv1.RegisterUserRequest{
		Username: w.cfg.username, Password: w.cfg.password})
	if err != nil {
		return ctx, fmt.Errorf("RegisterUser: %w", err)
	}
	login, err := ids.Login(ctx, &identityv1.LoginRequest{Username: w.cfg.username, Password: w.cfg.password})
	if err != nil {
		return ctx, fmt.Errorf("Login: %w", err)
	}
	w.userID = reg.GetUser().GetUserId()
	w.out.UserID = w.userID
	say("registered %s (%s)", w.cfg.username, w.userID)
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+login.GetAccessToken()), nil
}

// shorten creates a short link and resolves it.
func (w *walk) shorten(ctx context.Context) error {
	links := shortenerv1.NewShortenerServiceClient(w.conn)
	longURL := "https://example.com/walk/" + w.cfg.username
	created, err := links.CreateShortUrl(ctx, &shortenerv1.CreateShortUrlRequest{LongUrl: longURL})
	if err != nil {
		return fmt.Errorf("CreateShortUrl: %w", err)
	}
	short := created.GetShortUrl()
	resolved, err := links.ResolveShortUrl(ctx, &shortenerv1.ResolveShortUrlRequest{Code: short.GetCode()})
	if err != nil {
		return fmt.Errorf("ResolveShortUrl: %w", err)
	}
	w.out.ShortCode, w.out.LongURL, w.out.ResolvedURL = short.GetCode(), longURL, resolved.GetLongUrl()
	say("%s -> %s", short.GetShortUrl(), resolved.GetLongUrl())
	return nil
}

// timeline follows the peer, posts, and reads the home timeline two posts a page.
func (w *walk) timeline(ctx context.Context) error {
	graph := feedv1.NewGraphServiceClient(w.conn)
	if _, err := graph.FollowUser(ctx, &feedv1.FollowUserRequest{
		User: &feedv1.UserRef{User: &feedv1.UserRef_Username{Username: w.cfg.peer}}}); err != nil {
		return fmt.Errorf("FollowUser: %w", err)
	}
	post, err := feedv1.NewPostServiceClient(w.conn).CreatePost(ctx, &feedv1.CreatePostRequest{
		Text: "hello from " + w.cfg.username})
	if err != nil {
		return fmt.Errorf("CreatePost: %w", err)
	}
	w.out.PostID = post.GetPost().GetPostId()

	timeline := feedv1.NewTimelineServiceClient(w.conn)
	w.out.TimelinePostIDs, w.out.PeerPostIDs = []string{}, []string{}
	for token := ""; ; {
		page, err := timeline.GetHomeTimeline(ctx, &feedv1.GetHomeTimelineRequest{PageSize: 2, PageToken: token})
		if err != nil {
			return fmt.Errorf("GetHomeTimeline: %w", err)
		}
		w.out.TimelinePages++
		for _, p := range page.GetPosts() {
			w.out.TimelinePostIDs = append(w.out.TimelinePostIDs, p.GetPostId())
			if p.GetAuthorUsername() == w.cfg.peer {
				w.out.PeerPostIDs = append(w.out.PeerPostIDs, p.GetPostId())
			}
		}
		if token = page.GetNextPageToken(); token == "" {
			break
		}
	}
	say("home timeline: %d posts in %d pages", len(w.out.TimelinePostIDs), w.out.TimelinePages)
	return nil
}

// chat opens a direct conversation with the peer and, over one Connect stream,
// sends a message, reads its ack and the peer's echo, marks the echo read and
// waits for the peer's READ receipt covering the message.
func (w *walk) chat(ctx context.Context) error {
	chats := chatv1.NewChatServiceClient(w.conn)
	created, err := chats.CreateConversation(ctx, &chatv1.CreateConversationRequest{
		Type: chatv1.ConversationType_CONVERSATION_TYPE_DIRECT, MemberUsernames: []string{w.cfg.peer}})
	if err != nil {
		return fmt.Errorf("CreateConversation: %w", err)
	}
	convID := created.GetConversation().GetConversationId()
	text := "hello from " + w.cfg.username
	w.out.ConversationID, w.out.SentText = convID, text

	ctx, cancel := context.WithTimeout(ctx, chatWait)
	defer cancel() // ends the stream
	stream, err := chats.Connect(ctx)
	if err != nil {
		return fmt.Errorf("Connect: %w", err)
	}
	send := func(ev *chatv1.ClientEvent) error {
		if err := stream.Send(ev); err != nil {
			// The stream broke: Recv says why.
			_, rerr := stream.Recv()
			return fmt.Errorf("Connect send: %w", rerr)
		}
		return nil
	}
	if err := send(&chatv1.ClientEvent{Event: &chatv1.ClientEvent_Hello{
		Hello: &chatv1.Hello{DeviceId: "walk-go"}}}); err != nil {
		return err
	}

	var sentID, echo, readUpTo string
	for sentID == "" || echo == "" || !idAtLeast(readUpTo, sentID) {
		ev, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("Connect: stream ended before the round trip finished "+
				"(sent %q, echo %q, read up to %q): %w", sentID, echo, readUpTo, err)
		}
		switch e := ev.GetEvent().(type) {
		case *chatv1.ServerEvent_Synced:
			err = send(&chatv1.ClientEvent{Event: &chatv1.ClientEvent_Send{Send: &chatv1.SendEvent{
				ClientMessageId: "walk-1", ConversationId: convID, Text: text}}})
		case *chatv1.ServerEvent_SendAck:
			sentID = e.SendAck.GetMessage().GetMessageId()
		case *chatv1.ServerEvent_Message:
			if m := e.Message; m.GetSenderUsername() == w.cfg.peer {
				echo = m.GetText()
				err = send(&chatv1.ClientEvent{Event: &chatv1.ClientEvent_MarkRead{MarkRead: &chatv1.MarkReadEvent{
					ConversationId: convID, UpToMessageId: m.GetMessageId()}}})
			}
		case *chatv1.ServerEvent_Receipt:
			if r := e.Receipt; r.GetUserId() != w.userID && r.GetStatus() == chatv1.ReceiptStatus_RECEIPT_STATUS_READ {
				readUpTo = r.GetUpToMessageId()
			}
		case *chatv1.ServerEvent_Error:
			return fmt.Errorf("Connect: event error %d %s: %s", e.Error.GetCode(), e.Error.GetReason(),
				e.Error.GetMessage())
		}
		if err != nil {
			return err
		}
	}
	_ = stream.CloseSend()
	w.out.SentMessageID, w.out.EchoText, w.out.ReadUpTo = sentID, echo, readUpTo
	say("chat: sent %s, got %q, read up to %s", sentID, echo, readUpTo)
	return nil
}

// idAtLeast compares two Snowflake ids (decimal strings); an empty id is below every other.
func idAtLeast(a, b string) bool {
	x, errA := strconv.ParseUint(a, 10, 64)
	y, errB := strconv.ParseUint(b, 10, 64)
	if errA != nil || errB != nil {
		return a != "" && a >= b
	}
	return x >= y
}

// upload sends the file in two Upload streams: the first stops halfway, as a
// dropped connection would, and the second resumes at the committed offset.
func (w *walk) upload(ctx context.Context) error {
	data, err := os.ReadFile(w.cfg.file)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(data)
	files := mediav1.NewMediaServiceClient(w.conn)
	created, err := files.CreateUpload(ctx, &mediav1.CreateUploadRequest{
		Filename: filepath.Base(w.cfg.file), ContentType: "image/png",
		SizeBytes: int64(len(data)), Sha256: hex.EncodeToString(sum[:])})
	if err != nil {
		return fmt.Errorf("CreateUpload: %w", err)
	}
	up := created.GetUpload()
	chunk := up.GetChunkSizeHint()
	if chunk <= 0 {
		chunk = 1 << 20
	}

	stream := func(start, stop int64) (*mediav1.Upload, error) {
		s, err := files.Upload(ctx)
		if err != nil {
			return nil, err
		}
		for off := start; off < stop; off += chunk {
			end := min(off+chunk, stop)
			err := s.Send(&mediav1.UploadRequest{UploadId: up.GetUploadId(), Offset: off, Data: data[off:end]})
			if errors.Is(err, io.EOF) {
				break // the server ended the stream: CloseAndRecv says why
			} else if err != nil {
				return nil, err
			}
		}
		resp, err := s.CloseAndRecv()
		return resp.GetUpload(), err
	}

	size := int64(len(data))
	if _, err := stream(0, size/2); err != nil {
		return fmt.Errorf("Upload (first half): %w", err)
	}
	got, err := files.GetUpload(ctx, &mediav1.GetUploadRequest{UploadId: up.GetUploadId()})
	if err != nil {
		return fmt.Errorf("GetUpload: %w", err)
	}
	committed := got.GetUpload().GetCommittedBytes()
	done, err := stream(committed, size)
	if err != nil {
		return fmt.Errorf("Upload (resumed at %d): %w", committed, err)
	}
	w.out.UploadID, w.out.ResumedFrom, w.out.CommittedBytes = up.GetUploadId(), committed, done.GetCommittedBytes()
	say("upload: resumed at %d, %d/%d bytes stored", committed, done.GetCommittedBytes(), size)
	return nil
}

// badRequest sends a link the server must refuse and reads the
// google.rpc.BadRequest field violations from the status details.
func (w *walk) badRequest(ctx context.Context) error {
	_, err := shortenerv1.NewShortenerServiceClient(w.conn).CreateShortUrl(ctx,
		&shortenerv1.CreateShortUrlRequest{LongUrl: "not a url"})
	if err == nil {
		return errors.New("a bad long_url was accepted")
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("CreateShortUrl: not a gRPC status: %w", err)
	}
	fields := []string{}
	for _, d := range st.Details() {
		if bad, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range bad.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		}
	}
	// The canonical name (INVALID_ARGUMENT), as google.rpc.Code spells it.
	w.out.BadRequestCode, w.out.BadRequestFields = code.Code(st.Code()).String(), fields
	say("bad request: %s %v", w.out.BadRequestCode, fields)
	return nil
}
