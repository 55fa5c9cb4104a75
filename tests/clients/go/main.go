// Command cri-client-go is a CRI ImageService client on grpc-go, built by the
// integration tests (tests/common/clients.rs) from Debian's packaged grpc-go 1.33 in
// GOPATH mode. It dials a unix socket exactly as kubelet 1.26 and crictl 1.26 do, so
// it sends the bare socket path as the HTTP/2 `:authority`.
//
// Usage:
//
//	cri-client-go < spec.json           run an RPC sequence, print one JSON document
//	cri-client-go record-headers SOCKET serve SOCKET, print each request's headers
//
// The spec on stdin:
//
//	{"socket": "/abs/path.sock", "descriptor_set": "/abs/api.pb",
//	 "image": "host/repo:tag", "auth": {"username": "u", "password": "p"},
//	 "steps": ["ImageFsInfo", "PullImage", ...], "timeout_seconds": 60}
//
// Messages are built from the FileDescriptorSet `protoc --include_imports
// --descriptor_set_out` makes of proto/runtime/v1/api.proto (dynamicpb), so no
// code generator is needed. gRPC errors are results, not crashes: the output is
// always {"client", "version", "results": [{"rpc", "ok", "response" | "responses" |
// "code", "code_name", "message"}]} with responses in proto3 JSON (proto field names).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"os"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

const service = "runtime.v1.ImageService"

// The sequence kubelet's image manager exercises, run when the spec names no steps.
var defaultSteps = []string{
	"ImageFsInfo", "PullImage", "ListImages", "ImageStatus", "StreamImages",
	"RemoveImage", "ImageStatus",
}

type credentials struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

type spec struct {
	Socket         string       `json:"socket"`
	DescriptorSet  string       `json:"descriptor_set"`
	Image          string       `json:"image"`
	Auth           *credentials `json:"auth"`
	Steps          []string     `json:"steps"`
	TimeoutSeconds int          `json:"timeout_seconds"`
}

type result struct {
	RPC       string            `json:"rpc"`
	OK        bool              `json:"ok"`
	Response  json.RawMessage   `json:"response,omitempty"`
	Responses []json.RawMessage `json:"responses,omitempty"`
	Code      *uint32           `json:"code,omitempty"`
	CodeName  string            `json:"code_name,omitempty"`
	Message   string            `json:"message,omitempty"`
}

type output struct {
	Client  string   `json:"client"`
	Version string   `json:"version"`
	Target  string   `json:"target"`
	Results []result `json:"results"`
}

// dynamicCodec marshals dynamicpb messages with the protobuf v2 API. grpc-go 1.33's
// default codec goes through github.com/golang/protobuf 1.3, whose proto.Message
// needs the generated v1 methods a dynamic message lacks.
type dynamicCodec struct{}

func (dynamicCodec) Marshal(v interface{}) ([]byte, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("cannot marshal %T", v)
	}
	return proto.Marshal(m)
}

func (dynamicCodec) Unmarshal(data []byte, v interface{}) error {
	m, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("cannot unmarshal into %T", v)
	}
	return proto.Unmarshal(data, m)
}

func (dynamicCodec) Name() string { return "proto" }

func main() {
	if len(os.Args) == 3 && os.Args[1] == "record-headers" {
		if err := recordHeaders(os.Args[2]); err != nil {
			fatal(err)
		}
		return
	}
	if len(os.Args) != 1 {
		fatal(errors.New("usage: cri-client-go < spec.json | cri-client-go record-headers SOCKET"))
	}
	var s spec
	if err := json.NewDecoder(os.Stdin).Decode(&s); err != nil {
		fatal(fmt.Errorf("reading the spec from stdin: %w", err))
	}
	out, err := runSequence(s)
	if err != nil {
		fatal(err)
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetIndent("", "  ")
	if err := encoder.Encode(out); err != nil {
		fatal(err)
	}
}

// fatal is for failures of the program itself (bad spec, unreadable descriptors);
// gRPC errors are reported in the results instead.
func fatal(err error) {
	fmt.Fprintf(os.Stderr, "cri-client-go: %v\n", err)
	os.Exit(2)
}

func loadService(path string) (protoreflect.ServiceDescriptor, error) {
	raw, err := ioutil.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(raw, &set); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	files, err := protodesc.NewFiles(&set)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	found, err := files.FindDescriptorByName(service)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	svc, ok := found.(protoreflect.ServiceDescriptor)
	if !ok {
		return nil, fmt.Errorf("%s: %s is not a service", path, service)
	}
	return svc, nil
}

// requestJSON is the request each step sends, in proto3 JSON.
func requestJSON(rpc string, s spec) (map[string]interface{}, error) {
	image := map[string]interface{}{"image": s.Image}
	switch rpc {
	case "ImageFsInfo", "ListImages", "StreamImages":
		return map[string]interface{}{}, nil
	case "PullImage":
		request := map[string]interface{}{"image": image}
		if s.Auth != nil {
			request["auth"] = map[string]interface{}{
				"username": s.Auth.Username,
				"password": s.Auth.Password,
			}
		}
		return request, nil
	case "ImageStatus":
		return map[string]interface{}{"image": image, "verbose": true}, nil
	case "RemoveImage":
		return map[string]interface{}{"image": image}, nil
	}
	return nil, fmt.Errorf("unknown step %q", rpc)
}

func runSequence(s spec) (*output, error) {
	svc, err := loadService(s.DescriptorSet)
	if err != nil {
		return nil, err
	}
	timeout := time.Duration(s.TimeoutSeconds) * time.Second
	if timeout <= 0 {
		timeout = 60 * time.Second
	}
	steps := s.Steps
	if len(steps) == 0 {
		steps = defaultSteps
	}
	// As kubelet 1.26 (pkg/kubelet/cri/remote) and crictl 1.26 dial: the target is the
	// bare socket path, which grpc-go's passthrough resolver also makes the
	// `:authority`, and a context dialer that dials the address it is handed.
	conn, err := grpc.Dial(s.Socket,
		grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("dialling %s: %w", s.Socket, err)
	}
	defer conn.Close()

	out := &output{Client: "grpc-go", Version: grpc.Version, Target: s.Socket}
	for _, rpc := range steps {
		method := svc.Methods().ByName(protoreflect.Name(rpc))
		if method == nil {
			return nil, fmt.Errorf("%s has no method %s", service, rpc)
		}
		fields, err := requestJSON(rpc, s)
		if err != nil {
			return nil, err
		}
		request, err := buildMessage(method.Input(), fields)
		if err != nil {
			return nil, fmt.Errorf("%s request: %w", rpc, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		var r result
		if method.IsStreamingServer() {
			r = callServerStream(ctx, conn, method, request)
		} else {
			r = callUnary(ctx, conn, method, request)
		}
		cancel()
		r.RPC = rpc
		out.Results = append(out.Results, r)
	}
	return out, nil
}

func buildMessage(desc protoreflect.MessageDescriptor, fields map[string]interface{}) (proto.Message, error) {
	raw, err := json.Marshal(fields)
	if err != nil {
		return nil, err
	}
	message := dynamicpb.NewMessage(desc)
	if err := protojson.Unmarshal(raw, message); err != nil {
		return nil, err
	}
	return message, nil
}

func fullMethod(method protoreflect.MethodDescriptor) string {
	return fmt.Sprintf("/%s/%s", service, method.Name())
}

func callUnary(ctx context.Context, conn *grpc.ClientConn, method protoreflect.MethodDescriptor, request proto.Message) result {
	response := dynamicpb.NewMessage(method.Output())
	if err := conn.Invoke(ctx, fullMethod(method), request, response, grpc.ForceCodec(dynamicCodec{})); err != nil {
		return failure(err)
	}
	encoded, err := encode(response)
	if err != nil {
		return failure(err)
	}
	return result{OK: true, Response: encoded}
}

func callServerStream(ctx context.Context, conn *grpc.ClientConn, method protoreflect.MethodDescriptor, request proto.Message) result {
	desc := &grpc.StreamDesc{StreamName: string(method.Name()), ServerStreams: true}
	stream, err := conn.NewStream(ctx, desc, fullMethod(method), grpc.ForceCodec(dynamicCodec{}))
	if err != nil {
		return failure(err)
	}
	if err := stream.SendMsg(request); err != nil {
		return failure(err)
	}
	if err := stream.CloseSend(); err != nil {
		return failure(err)
	}
	responses := []json.RawMessage{}
	for {
		response := dynamicpb.NewMessage(method.Output())
		err := stream.RecvMsg(response)
		if err == io.EOF {
			return result{OK: true, Responses: responses}
		}
		if err != nil {
			return failure(err)
		}
		encoded, err := encode(response)
		if err != nil {
			return failure(err)
		}
		responses = append(responses, encoded)
	}
}

func encode(message proto.Message) (json.RawMessage, error) {
	raw, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(message)
	if err != nil {
		return nil, err
	}
	return json.RawMessage(raw), nil
}

func failure(err error) result {
	s := status.Convert(err)
	code := uint32(s.Code())
	return result{Code: &code, CodeName: s.Code().String(), Message: s.Message()}
}

// recordHeaders serves HTTP/2 on a unix socket just far enough for a gRPC client to
// send its request headers, prints them (as a JSON line of [name, value] pairs, in
// the order sent) and answers every request with a trailers-only Unimplemented. It
// shows what `:authority` a client sends, which a server that validates the
// authority (as hyper's h2 does) would reset before anyone could look.
func recordHeaders(socket string) error {
	listener, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	for {
		conn, err := listener.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer conn.Close()
			if err := recordConnection(conn); err != nil && err != io.EOF {
				fmt.Fprintf(os.Stderr, "record-headers: %v\n", err)
			}
		}()
	}
}

func recordConnection(conn net.Conn) error {
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(conn, preface); err != nil {
		return err
	}
	if string(preface) != http2.ClientPreface {
		return fmt.Errorf("not an HTTP/2 client preface: %q", preface)
	}
	framer := http2.NewFramer(conn, conn)
	framer.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := framer.WriteSettings(); err != nil {
		return err
	}
	for {
		frame, err := framer.ReadFrame()
		if err != nil {
			return err
		}
		switch f := frame.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if err := framer.WriteSettingsAck(); err != nil {
					return err
				}
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				if err := framer.WritePing(true, f.Data); err != nil {
					return err
				}
			}
		case *http2.MetaHeadersFrame:
			pairs := [][2]string{}
			for _, field := range f.Fields {
				pairs = append(pairs, [2]string{field.Name, field.Value})
			}
			line, err := json.Marshal(map[string]interface{}{"headers": pairs})
			if err != nil {
				return err
			}
			// One write per line: several connections may print at once.
			os.Stdout.Write(append(line, '\n'))
			block, err := trailersOnly()
			if err != nil {
				return err
			}
			if err := framer.WriteHeaders(http2.HeadersFrameParam{
				StreamID:      f.StreamID,
				BlockFragment: block,
				EndStream:     true,
				EndHeaders:    true,
			}); err != nil {
				return err
			}
		}
	}
}

// trailersOnly is the HPACK block of a gRPC response that ends the call at once.
func trailersOnly() ([]byte, error) {
	var block bytes.Buffer
	encoder := hpack.NewEncoder(&block)
	for _, field := range []hpack.HeaderField{
		{Name: ":status", Value: "200"},
		{Name: "content-type", Value: "application/grpc"},
		{Name: "grpc-status", Value: "12"},
		{Name: "grpc-message", Value: "headers recorded"},
	} {
		if err := encoder.WriteField(field); err != nil {
			return nil, err
		}
	}
	return block.Bytes(), nil
}
