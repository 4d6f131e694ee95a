/**
 * Every request is checked against the rules its proto declares
 * (`buf.validate` annotations in protos/) before it is sent.
 *
 * `checkRequests` is a grpc-js client interceptor: for each outgoing message
 * it encodes the ts-proto object with the method's own serializer, decodes the
 * bytes as the @bufbuild/protobuf message of the same type (the schemas
 * protoc-gen-es writes to src/gen-es/) and runs @bufbuild/protovalidate on it.
 * A message that breaks a rule is not sent: the call fails with
 * INVALID_ARGUMENT and a `grpc-status-details-bin` trailer holding one
 * `google.rpc.BadRequest` field violation per broken rule, the same shape the
 * server answers with, so a caller reads both the same way. A unary (or
 * server-streaming) call is only started once its request passed, so a
 * refused one never reaches the network; on a client stream the refused
 * message is held back and the stream is cancelled.
 */

import { type DescFile, type DescMessage, createRegistry, fromBinary } from "@bufbuild/protobuf";
import { pathToString } from "@bufbuild/protobuf/reflect";
import { createValidator } from "@bufbuild/protovalidate";
import {
  type InterceptingListener,
  type Interceptor,
  InterceptingCall,
  type Listener,
  Metadata,
  type ServiceError,
  type StatusObject,
  status,
} from "@grpc/grpc-js";

import { file_sysdesign_chat_v1_chat } from "./gen-es/sysdesign/chat/v1/chat_pb";
import { file_sysdesign_feed_v1_feed } from "./gen-es/sysdesign/feed/v1/feed_pb";
import { file_sysdesign_identity_v1_identity } from "./gen-es/sysdesign/identity/v1/identity_pb";
import { file_sysdesign_media_v1_media } from "./gen-es/sysdesign/media/v1/media_pb";
import { file_sysdesign_shortener_v1_shortener } from "./gen-es/sysdesign/shortener/v1/shortener_pb";
import { BadRequest } from "./gen/google/rpc/error_details";
import { Status } from "./gen/google/rpc/status";

/** How the details of a request refused before sending begin. */
export const REFUSED_LOCALLY = "refused before sending: ";

/** The files that declare services, and everything they import (sysdesign.rules.v1's predefined rules). */
function withImports(files: DescFile[], seen = new Set<DescFile>()): DescFile[] {
  for (const file of files) {
    if (seen.has(file)) continue;
    seen.add(file);
    withImports(file.dependencies, seen);
  }
  return [...seen];
}

const registry = createRegistry(
  ...withImports([
    file_sysdesign_chat_v1_chat,
    file_sysdesign_feed_v1_feed,
    file_sysdesign_identity_v1_identity,
    file_sysdesign_media_v1_media,
    file_sysdesign_shortener_v1_shortener,
  ]),
);
// The registry holds the predefined rules' extensions, which the validator needs to read them.
const validator = createValidator({ registry });

/** The request type of a method path (`/sysdesign.shortener.v1.ShortenerService/GetShortUrl`). */
function requestSchema(path: string): DescMessage | undefined {
  const [, service = "", method = ""] = path.split("/");
  return registry.getService(service)?.methods.find((m) => m.name === method)?.input;
}

/** The status a message that breaks its rules fails with, or undefined when it keeps them. */
export function refusal(schema: DescMessage, bytes: Uint8Array): StatusObject | undefined {
  const result = validator.validate(schema, fromBinary(schema, bytes));
  if (result.kind === "valid") return undefined;
  if (result.kind === "error") {
    // The rules themselves could not be compiled or evaluated: a client bug, never sent.
    return {
      code: status.INTERNAL,
      details: `${REFUSED_LOCALLY}cannot check ${schema.typeName}: ${result.error.message}`,
      metadata: new Metadata(),
    };
  }
  const fieldViolations = result.violations.map((v) => ({
    field: pathToString(v.field) || "request",
    description: v.message || v.ruleId,
    reason: v.ruleId,
    localizedMessage: undefined,
  }));
  const message = fieldViolations.map((v) => `${v.field}: ${v.description}`).join("; ");
  const detail = Status.encode({
    code: status.INVALID_ARGUMENT,
    message,
    details: [
      {
        typeUrl: "type.googleapis.com/google.rpc.BadRequest",
        value: Buffer.from(BadRequest.encode({ fieldViolations }).finish()),
      },
    ],
  }).finish();
  const metadata = new Metadata();
  metadata.set("grpc-status-details-bin", Buffer.from(detail));
  return { code: status.INVALID_ARGUMENT, details: REFUSED_LOCALLY + message, metadata };
}

/** Whether an error is a refusal of this module's rather than the server's. */
export function refusedLocally(err: ServiceError): boolean {
  return err.details.startsWith(REFUSED_LOCALLY);
}

/** The client interceptor that checks every request message, streamed ones included. */
export const checkRequests: Interceptor = (options, nextCall) => {
  const method = options.method_definition;
  const schema = requestSchema(method.path);
  const call = nextCall(options);
  if (schema === undefined) return new InterceptingCall(call); // not a sysdesign method: nothing declared
  let refused: StatusObject | undefined;
  let listener: InterceptingListener | undefined;
  let startCall: (() => void) | undefined;
  // A refused stream ends with the refusal rather than with the CANCELLED its cancel causes.
  const statusOf: Listener = { onReceiveStatus: (st, next) => next(refused ?? st) };
  return new InterceptingCall(call, {
    start(metadata, l, next) {
      listener = l;
      if (method.requestStream) next(metadata, statusOf);
      else startCall = () => next(metadata, statusOf); // started once its one message passed
    },
    sendMessage(message, next) {
      if (refused) return;
      refused = refusal(schema, method.requestSerialize(message));
      if (!refused) {
        startCall?.();
        startCall = undefined;
        next(message);
        return;
      }
      const st = refused;
      call.cancelWithStatus(st.code, st.details);
      if (startCall) {
        // Never started: nothing was sent, and the call below has no listener to tell.
        startCall = undefined;
        process.nextTick(() => listener?.onReceiveStatus(st));
      }
    },
    halfClose(next) {
      if (!refused) next();
    },
  });
};
