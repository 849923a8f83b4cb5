//! c10d's Gloo collectives through the shim, with threads as ranks (each its own store client
//! and Gloo group on 127.0.0.1, as processes would be): values, several tensors coalesced,
//! started work waited later, and a rank that fails or stays away.

use std::time::{Duration, Instant};

use cnclip_torch_ext::c10d::{ProcessGroup, ReduceOp, Store};
use tch::{Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `body(rank, group)` on `size` ranks, one thread each, after they meet at a store that
/// rank 0 serves; the results in rank order.
fn on_ranks<T: Send>(size: usize, timeout: Duration, body: impl Fn(usize, ProcessGroup) -> T + Sync) -> Vec<T> {
    let server = Store::server("127.0.0.1", 0, size, TIMEOUT).unwrap();
    let port = server.port();
    assert_ne!(port, 0);
    std::thread::scope(|scope| {
        let body = &body;
        let server = &server;
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                scope.spawn(move || {
                    let client;
                    let store = if rank == 0 {
                        server
                    } else {
                        client = Store::client("127.0.0.1", port, size, TIMEOUT).unwrap();
                        &client
                    };
                    let group = ProcessGroup::gloo(store, rank, size, timeout, Some("127.0.0.1")).unwrap();
                    assert_eq!((group.rank(), group.size()), (rank, size));
                    body(rank, group)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn all_reduce_sums_and_maxes_over_two_and_four_ranks() {
    for size in [2, 4] {
        let results = on_ranks(size, TIMEOUT, |rank, group| {
            let r = rank as f32;
            let t = Tensor::from_slice(&[r, 10.0 * r, -r]).view([1, 3]);
            group.all_reduce(&[&t], ReduceOp::Sum).unwrap();
            let m = Tensor::from_slice(&[r, -r]);
            group.all_reduce(&[&m], ReduceOp::Max).unwrap();
            (values(&t), values(&m))
        });
        let total: f32 = (0..size).map(|r| r as f32).sum();
        for (sum, max) in results {
            assert_eq!(sum, [total, 10.0 * total, -total]);
            assert_eq!(max, [(size - 1) as f32, 0.0]);
        }
    }
}

#[test]
fn tensors_of_several_shapes_reduce_coalesced_and_work_can_be_waited_later() {
    let results = on_ranks(3, TIMEOUT, |rank, group| {
        let a = Tensor::full([2, 2], rank as f64 + 1.0, (Kind::Float, tch::Device::Cpu));
        let b = Tensor::arange(5, (Kind::Float, tch::Device::Cpu)) * (rank as f64);
        let work = group.start_all_reduce(&[&a, &b], ReduceOp::Sum).unwrap();
        // A second collective started behind the first, as gradient buckets are.
        let c = Tensor::from_slice(&[rank as f32]);
        let second = group.start_all_reduce(&[&c], ReduceOp::Sum).unwrap();
        work.wait().unwrap();
        second.wait().unwrap();
        (values(&a), values(&b), values(&c))
    });
    for (a, b, c) in results {
        assert_eq!(a, [6.0; 4]);
        assert_eq!(b, [0.0, 3.0, 6.0, 9.0, 12.0]);
        assert_eq!(c, [3.0]);
    }
}

#[test]
fn all_gather_and_broadcast_move_each_ranks_values() {
    let results = on_ranks(4, TIMEOUT, |rank, group| {
        let input = Tensor::from_slice(&[rank as f32, 100.0 + rank as f32]);
        let outputs: Vec<Tensor> = (0..4).map(|_| Tensor::zeros([2], (Kind::Float, tch::Device::Cpu))).collect();
        group.all_gather(&outputs.iter().collect::<Vec<_>>(), &input).unwrap();
        let b = Tensor::from_slice(&[rank as f32; 3]);
        group.broadcast(&b, 2).unwrap();
        group.barrier().unwrap();
        (outputs.iter().map(values).collect::<Vec<_>>(), values(&b))
    });
    for (gathered, broadcast) in results {
        assert_eq!(gathered, (0..4).map(|r| vec![r as f32, 100.0 + r as f32]).collect::<Vec<_>>());
        assert_eq!(broadcast, [2.0; 3]);
    }
}

#[test]
fn a_rank_that_leaves_fails_the_others_collective_quickly() {
    let started = Instant::now();
    let results = on_ranks(3, Duration::from_secs(60), |rank, group| {
        if rank == 2 {
            // Gone (its connections closed) before the collective, as a killed process.
            drop(group);
            return None;
        }
        let t = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
        Some(group.all_reduce(&[&t], ReduceOp::Sum).map_err(|e| e.to_string()))
    });
    for result in results.into_iter().flatten() {
        let message = result.unwrap_err();
        assert!(message.starts_with("all-reduce: "), "{message}");
    }
    assert!(started.elapsed() < Duration::from_secs(30), "not failed within 30 s of a 60 s timeout");
}

#[test]
fn the_barrier_names_a_rank_that_does_not_come() {
    let results = on_ranks(3, Duration::from_secs(2), |rank, group| {
        if rank == 1 {
            // Alive but elsewhere: never reaches the barrier while the others wait.
            std::thread::sleep(Duration::from_secs(4));
            return None;
        }
        Some(group.barrier().map_err(|e| e.to_string()))
    });
    let message = results[0].clone().unwrap().unwrap_err();
    // c10d's words: "[Rank 0]: Ranks 1 failed to pass monitoredBarrier in 2000 ms".
    assert!(message.contains("Ranks 1 failed"), "{message}");
}

#[test]
fn a_client_with_no_server_fails_after_its_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = Instant::now();
    let error = Store::client("127.0.0.1", port, 2, Duration::from_secs(2)).err().unwrap();
    assert!(error.to_string().starts_with("connecting to the rendezvous store: "), "{error}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn the_store_passes_values_between_ranks() {
    let server = Store::server("127.0.0.1", 0, 2, TIMEOUT).unwrap();
    let client = Store::client("127.0.0.1", server.port(), 2, TIMEOUT).unwrap();
    server.set("run", b"epoch 3").unwrap();
    assert_eq!(client.get("run").unwrap(), b"epoch 3");
    assert_eq!(client.add("joined", 1).unwrap(), 1);
    assert_eq!(server.add("joined", 1).unwrap(), 2);
}
