//! gRPC clients we did not write, against cri-imaged's socket: grpc-go 1.33 dialled
//! as kubelet 1.26 and crictl 1.26 dial (bare socket path, which it sends as the
//! HTTP/2 `:authority`) and Python grpcio with each way of setting the authority.
//! Each runs kubelet's image RPCs (ImageFsInfo, PullImage with credentials,
//! ListImages, ImageStatus verbose, StreamImages, RemoveImage, ImageStatus) first
//! against containerd's own CRI (which proves the client) and then against
//! cri-imaged, and both servers must answer alike. A header recorder pins down the
//! `:authority` each client sends.

mod common;

use common::clients::{
    header, tonic_sequence, Answer, Client, HeaderRecorder, PythonAuthority, Sequence, SequenceRun,
};
use common::containerd::Containerd;
use common::cri::{Daemon, DaemonConfig};
use common::images::{self, ImageUser, PushedImage};
use common::registry::Registry;
use common::scenario::start;
use tonic::Code;

const USER: &str = "kube";
const PASSWORD: &str = "clients-S3cret";

/// containerd (CRI on), a TLS + htpasswd registry holding one test image, and
/// cri-imaged storing into that containerd.
struct World {
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    pushed: PushedImage,
}

impl World {
    fn start(repo: &str, user: ImageUser) -> World {
        let (containerd, registry) = start(|| Registry::htpasswd(USER, PASSWORD));
        // containerd's CRI trusts the registry's CA; credentials come per request.
        containerd.add_registry(&registry);
        let pushed = images::busybox().user(user).build().push(&registry, repo);
        let daemon = DaemonConfig::new(&containerd).registry(&registry).start();
        World {
            containerd,
            registry,
            daemon,
            pushed,
        }
    }

    /// Every RPC on the pushed image, pulling with the registry's credentials.
    fn sequence(&self) -> Sequence {
        Sequence::full(&self.pushed.reference, self.registry.credentials())
    }
}

/// Each failed step as `RPC: Code: message`.
fn failures(run: &SequenceRun) -> Vec<String> {
    run.steps
        .iter()
        .filter_map(|step| {
            step.answer
                .as_ref()
                .err()
                .map(|e| format!("{}: {:?}: {}", step.rpc, e.code, e.message))
        })
        .collect()
}

/// containerd 1.6's CRI answers the whole sequence (it has no StreamImages), so the
/// client itself works: whatever fails against cri-imaged is cri-imaged's doing.
fn assert_containerd_answered(run: &SequenceRun, pushed: &PushedImage) {
    let what = format!("{} {} on containerd's CRI", run.client, run.version);
    let unexpected: Vec<String> = run
        .steps
        .iter()
        .filter(|s| s.rpc != "StreamImages")
        .filter_map(|s| s.answer.as_ref().err().map(|e| format!("{}: {e:?}", s.rpc)))
        .collect();
    assert!(unexpected.is_empty(), "{what}: {unexpected:#?}");
    if let Err(e) = run.answer("StreamImages", 0) {
        assert_eq!(e.code, Code::Unimplemented, "{what}: StreamImages: {e:?}");
    }
    assert_eq!(
        run.answer("PullImage", 0),
        &Ok(Answer::Pulled {
            image_ref: pushed.config_digest.clone()
        }),
        "{what}"
    );
    match run.answer("ImageStatus", 0) {
        Ok(Answer::Status {
            image: Some(image), ..
        }) => {
            assert_eq!(image.id, pushed.config_digest, "{what}");
            assert!(
                image.repo_tags.contains(&pushed.reference),
                "{what}: {image:?}"
            );
            assert!(
                image.repo_digests.contains(&pushed.digest_reference),
                "{what}: {image:?}"
            );
        }
        other => panic!("{what}: ImageStatus after the pull: {other:?}"),
    }
    assert_removed(run, &what);
}

/// The second ImageStatus, after RemoveImage, finds nothing (and is no error).
fn assert_removed(run: &SequenceRun, what: &str) {
    match run.answer("ImageStatus", 1) {
        Ok(Answer::Status { image: None, .. }) => {}
        other => panic!("{what}: ImageStatus after RemoveImage: {other:?}"),
    }
}

/// Every RPC of the sequence succeeded on cri-imaged.
fn assert_every_rpc_succeeded(run: &SequenceRun, daemon: &Daemon) {
    let failed = failures(run);
    assert!(
        failed.is_empty(),
        "{} {} on cri-imaged's socket:\n  {}\ncri-imaged's log:\n{}",
        run.client,
        run.version,
        failed.join("\n  "),
        daemon.log()
    );
}

/// The verbose ImageStatus `info["info"]`, parsed.
fn verbose_info(answer: &Answer) -> serde_json::Value {
    let Answer::Status { info, .. } = answer else {
        panic!("not an ImageStatus answer: {answer:?}");
    };
    let text = info
        .get("info")
        .unwrap_or_else(|| panic!("no info[\"info\"] in {info:?}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("info is not JSON ({e}): {text}"))
}

/// cri-imaged's answers (`ours`) equal containerd's CRI's (`theirs`) for the same
/// client, sequence and image, except that cri-imaged also implements StreamImages.
fn assert_same_answers(ours: &SequenceRun, theirs: &SequenceRun, pushed: &PushedImage) {
    let what = format!("{} {}", ours.client, ours.version);
    let ok = |run: &SequenceRun, rpc: &str, nth: usize| -> Answer {
        run.answer(rpc, nth)
            .clone()
            .unwrap_or_else(|e| panic!("{what}: {rpc} #{nth} on {}: {e:?}", run.client))
    };
    assert_eq!(
        ok(ours, "ImageFsInfo", 0),
        ok(theirs, "ImageFsInfo", 0),
        "{what}: ImageFsInfo (cri-imaged, containerd)"
    );
    assert_eq!(
        ok(ours, "PullImage", 0),
        ok(theirs, "PullImage", 0),
        "{what}: PullImage (cri-imaged, containerd)"
    );
    assert_eq!(
        ok(ours, "ListImages", 0),
        ok(theirs, "ListImages", 0),
        "{what}: ListImages (cri-imaged, containerd)"
    );
    let (our_status, their_status) = (ok(ours, "ImageStatus", 0), ok(theirs, "ImageStatus", 0));
    let (Answer::Status { image: mine, .. }, Answer::Status { image: yours, .. }) =
        (&our_status, &their_status)
    else {
        unreachable!("ImageStatus answers are statuses");
    };
    assert_eq!(mine, yours, "{what}: ImageStatus (cri-imaged, containerd)");
    assert_eq!(
        mine.as_ref().map(|i| i.id.as_str()),
        Some(pushed.config_digest.as_str())
    );
    let (my_info, your_info) = (verbose_info(&our_status), verbose_info(&their_status));
    assert_eq!(
        my_info["chainID"], your_info["chainID"],
        "{what}: verbose chainID"
    );
    assert_eq!(
        my_info["imageSpec"], your_info["imageSpec"],
        "{what}: verbose imageSpec"
    );
    // containerd 1.6 has no StreamImages; ours streams what ListImages lists.
    assert_eq!(
        ok(ours, "StreamImages", 0),
        ok(ours, "ListImages", 0),
        "{what}: StreamImages, ListImages on cri-imaged"
    );
    assert_eq!(ok(ours, "RemoveImage", 0), Answer::Removed);
    assert_removed(ours, &what);
}

/// The whole check for one client: containerd's CRI first (proves the client and
/// gives the expected answers), then cri-imaged, then the comparison.
fn check_client(client: Client, repo: &str, user: ImageUser) {
    let world = World::start(repo, user);
    let sequence = world.sequence();
    let theirs = client.run(world.containerd.socket(), &sequence);
    assert_containerd_answered(&theirs, &world.pushed);
    let ours = client.run(world.daemon.socket(), &sequence);
    assert_every_rpc_succeeded(&ours, &world.daemon);
    assert_same_answers(&ours, &theirs, &world.pushed);
    assert!(
        !world.daemon.log().contains(PASSWORD),
        "the password reached cri-imaged's log"
    );
}

#[test]
fn grpc_go_dialled_like_kubelet_with_the_bare_socket_path_gets_containerds_answers() {
    check_client(Client::Go, "clients/go", ImageUser::Uid("1000".into()));
}

#[test]
fn grpcio_with_its_default_authority_gets_containerds_answers() {
    check_client(
        Client::Python(PythonAuthority::Default),
        "clients/python-default",
        ImageUser::Name("nobody".into()),
    );
}

#[test]
fn grpcio_with_the_socket_path_as_authority_gets_containerds_answers() {
    check_client(
        Client::Python(PythonAuthority::SocketPath),
        "clients/python-path",
        ImageUser::Uid("1000".into()),
    );
}

#[test]
fn grpcio_with_an_empty_authority_gets_containerds_answers() {
    check_client(
        Client::Python(PythonAuthority::Empty),
        "clients/python-empty",
        ImageUser::Name("nobody".into()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_tonic_client_gets_containerds_answers_for_the_same_sequence() {
    let world = World::start("clients/tonic", ImageUser::Uid("1000".into()));
    let sequence = world.sequence();
    let theirs = tonic_sequence(world.containerd.socket(), &sequence).await;
    assert_containerd_answered(&theirs, &world.pushed);
    let ours = tonic_sequence(world.daemon.socket(), &sequence).await;
    assert_every_rpc_succeeded(&ours, &world.daemon);
    assert_same_answers(&ours, &theirs, &world.pushed);
}

/// What each client puts in `:authority` for a unix socket, seen by a server that
/// accepts anything. cri-imaged must serve every one of these.
#[test]
fn recorded_authority_is_the_bare_path_for_grpc_go_and_set_by_option_for_grpcio() {
    let recorder = HeaderRecorder::start();
    let path = recorder.socket().display().to_string();
    // grpc-core's default for `unix:///abs/path`: the path without its leading
    // slash, percent-encoded (which hyper's h2 refuses as an authority too).
    let encoded = path.trim_start_matches('/').replace('/', "%2F");
    let sequence = Sequence::of("busybox", None, &["ImageFsInfo"]);
    let cases = [
        (Client::Go, path.as_str(), "grpc-go/1.33.3"),
        (
            Client::Python(PythonAuthority::Default),
            encoded.as_str(),
            "grpc-python/",
        ),
        (
            Client::Python(PythonAuthority::SocketPath),
            path.as_str(),
            "grpc-python/",
        ),
        (Client::Python(PythonAuthority::Empty), "", "grpc-python/"),
    ];
    for (client, authority, user_agent) in cases {
        let before = recorder.requests().len();
        let run = client.run(recorder.socket(), &sequence);
        // The recorder answers Unimplemented: a gRPC error, reported, not a crash.
        match run.answer("ImageFsInfo", 0) {
            Err(e) => assert_eq!(e.code, Code::Unimplemented, "{client:?}: {e:?}"),
            Ok(answer) => panic!("{client:?}: the recorder answered {answer:?}"),
        }
        let requests = recorder.wait_requests(before + 1);
        let request = requests
            .get(before)
            .unwrap_or_else(|| panic!("{client:?}: nothing recorded; log:\n{}", recorder.log()));
        assert_eq!(
            header(request, ":path"),
            Some("/runtime.v1.ImageService/ImageFsInfo"),
            "{client:?}: {request:?}"
        );
        assert_eq!(
            header(request, ":authority"),
            Some(authority),
            "{client:?}: {request:?}"
        );
        assert!(
            header(request, "user-agent").is_some_and(|ua| ua.starts_with(user_agent)),
            "{client:?}: {request:?}"
        );
    }

    // Our own tonic client names no socket: tonic requires a URI, and the
    // connector ignores it (src/client.rs).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let before = recorder.requests().len();
    let run = runtime.block_on(tonic_sequence(recorder.socket(), &sequence));
    assert!(
        matches!(run.answer("ImageFsInfo", 0), Err(e) if e.code == Code::Unimplemented),
        "{run:?}"
    );
    let requests = recorder.wait_requests(before + 1);
    assert_eq!(
        requests.get(before).and_then(|r| header(r, ":authority")),
        Some("[::1]:0"),
        "{requests:?}"
    );
}

/// A 1 MiB image name is InvalidArgument for stock clients too: the status message
/// quotes a bounded prefix (grpc-core drops a status whose metadata passes 16 KiB and
/// reports RESOURCE_EXHAUSTED instead of the error).
#[test]
fn a_one_mib_image_name_reads_as_invalid_argument_in_every_client() {
    let containerd = Containerd::start();
    let daemon = DaemonConfig::new(&containerd).start();
    let huge = format!("example.com/{}", "a".repeat(1 << 20));
    let sequence = Sequence::of(&huge, None, &["PullImage", "ImageStatus"]);
    for client in [Client::Go, Client::Python(PythonAuthority::Default)] {
        let run = client.run(daemon.socket(), &sequence);
        for rpc in ["PullImage", "ImageStatus"] {
            match run.answer(rpc, 0) {
                Err(e) => {
                    assert_eq!(e.code, Code::InvalidArgument, "{client:?} {rpc}: {e:?}");
                    assert!(e.message.len() < 1024, "{client:?} {rpc}: {}", e.message);
                    assert!(e.message.contains("bytes in all"), "{}", e.message);
                }
                Ok(answer) => panic!("{client:?} {rpc}: {answer:?}"),
            }
        }
    }
}
