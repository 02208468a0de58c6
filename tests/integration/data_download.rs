//! CIFAR download against a tiny HTTP server on 127.0.0.1 (no other network is touched).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use vicinity::data::synth::{Compression, pack_tar};
use vicinity::data::{CIFAR10_CLASSES, Cifar, download_and_unpack, download_cifar, open_split};

use crate::common::TempDir;

/// Serves `body` at `/<name>` (404 elsewhere) on a loopback port for up to `requests`
/// requests or 20 seconds, whichever comes first. Returns the base URL.
fn serve(name: &str, body: Vec<u8>, requests: usize) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let path = format!("/{name}");
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut served = 0;
        while served < requests && Instant::now() < deadline {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            served += 1;
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&req);
            let target = line.split_whitespace().nth(1).unwrap_or("");
            let (status, data): (&str, &[u8]) = if target == path {
                ("200 OK", &body)
            } else {
                ("404 Not Found", b"not found")
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                data.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(data);
        }
    });
    (base, handle)
}

/// A miniature `cifar-10-binary.tar.gz`: the real layout with one or two records per file.
fn mini_cifar10_archive(work: &Path) -> Vec<u8> {
    let tree = work.join("tree");
    let dir = tree.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let record = |label: u8| {
        let mut r = vec![label];
        r.extend((0..3072u32).map(|i| (i % 251) as u8));
        r
    };
    for b in 1..=5u8 {
        let mut bytes = record(b);
        bytes.extend(record(b + 1));
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), record(7)).unwrap();
    std::fs::write(dir.join("batches.meta.txt"), CIFAR10_CLASSES.join("\n")).unwrap();
    let archive = work.join("cifar-10-binary.tar.gz");
    pack_tar(&tree, &archive, Compression::Gzip).unwrap();
    std::fs::read(archive).unwrap()
}

fn md5_hex(bytes: &[u8]) -> String {
    format!("{:x}", Md5::digest(bytes))
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn good_checksum_downloads_and_unpacks() {
    let t = TempDir::new("good");
    let body = mini_cifar10_archive(&t.0);
    let md5 = md5_hex(&body);
    let (base, server) = serve("cifar-10-binary.tar.gz", body, 1);
    let dest = t.0.join("data");
    let url = format!("{base}/cifar-10-binary.tar.gz");
    download_and_unpack(&url, &dest, &md5).unwrap();
    server.join().unwrap();
    assert_eq!(listing(&dest), ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]);
    let train = open_split(&dest, "train").unwrap();
    assert_eq!(train.len(), 10);
    assert_eq!(train.samples[0].label, 1);
    assert_eq!(open_split(&dest, "test").unwrap().samples[0].label, 7);

    // Complete already: download_cifar does not touch the network (nothing listens here now).
    let dir = download_cifar(Cifar::Cifar10, &dest, &base).unwrap();
    assert_eq!(dir, dest.join("cifar-10-batches-bin"));
    // A verified archive on disk is unpacked again without a download.
    std::fs::remove_dir_all(&dir).unwrap();
    download_and_unpack(&url, &dest, &md5).unwrap();
    assert!(dir.join("test_batch.bin").is_file());
}

#[test]
fn bad_checksum_fails_and_leaves_nothing() {
    let t = TempDir::new("bad");
    let body = mini_cifar10_archive(&t.0);
    // download_cifar expects the official MD5, which our miniature archive cannot match.
    let (base, server) = serve("cifar-10-binary.tar.gz", body, 1);
    let dest = t.0.join("data");
    let err = download_cifar(Cifar::Cifar10, &dest, &base).unwrap_err();
    server.join().unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("checksum mismatch") && msg.contains(Cifar::Cifar10.md5()),
        "{msg}"
    );
    assert!(listing(&dest).is_empty(), "left behind: {:?}", listing(&dest));
}

#[test]
fn http_error_fails_and_leaves_nothing() {
    let t = TempDir::new("404");
    let (base, server) = serve("something-else.tar.gz", vec![1, 2, 3], 1);
    let dest = t.0.join("data");
    let err = download_cifar(Cifar::Cifar100, &dest, &base).unwrap_err();
    server.join().unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("cifar-100-binary.tar.gz"), "{msg}");
    assert!(listing(&dest).is_empty(), "left behind: {:?}", listing(&dest));
}
