//! The vendored glommio's wake-first tasks (patches 7 and 8 in `vendor/glommio-patches/README.md`),
//! which the load generator's subscribers use: a task that asked for it runs before the tasks
//! woken with it, and a socket completion posted while a busy task queue runs wakes it within
//! that turn rather than after the queue drains.

use glommio::{spawn_local, timer::sleep, LocalExecutorBuilder};
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::Write;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

#[test]
fn a_wake_first_task_runs_before_the_tasks_woken_ahead_of_it() {
    LocalExecutorBuilder::default()
        .spawn(|| async {
            let gate = Rc::new(Cell::new(false));
            let wakers: Rc<RefCell<Vec<Waker>>> = Rc::default();
            let order: Rc<RefCell<Vec<usize>>> = Rc::default();
            let mut tasks = Vec::new();
            for i in 0..4 {
                let (gate, wakers, order) = (gate.clone(), wakers.clone(), order.clone());
                tasks.push(spawn_local(async move {
                    if i == 2 {
                        glommio::task::set_wake_first(true);
                    }
                    poll_fn(|cx| {
                        if gate.get() {
                            Poll::Ready(())
                        } else {
                            wakers.borrow_mut().push(cx.waker().clone());
                            Poll::Pending
                        }
                    })
                    .await;
                    order.borrow_mut().push(i);
                }));
            }
            // Let the four tasks run up to their wait.
            sleep(Duration::from_millis(1)).await;
            assert_eq!(wakers.borrow().len(), 4);
            gate.set(true);
            // Woken in order 0, 1, 2, 3: task 2 goes to the front, the others keep their order.
            for w in wakers.borrow_mut().drain(..) {
                w.wake();
            }
            for t in tasks {
                t.await;
            }
            assert_eq!(*order.borrow(), [2, 0, 1, 3]);
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn a_completion_during_a_busy_turn_wakes_a_wake_first_task_within_the_turn() {
    LocalExecutorBuilder::default()
        .spawn(|| async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let mut stream = glommio::net::TcpStream::connect(addr).await.unwrap();
            let (peer, _) = listener.accept().unwrap();
            let peer = Rc::new(RefCell::new(peer));
            let order: Rc<RefCell<Vec<&'static str>>> = Rc::default();

            let reader = {
                let order = order.clone();
                spawn_local(async move {
                    glommio::task::set_wake_first(true);
                    let mut buf = [0u8; 16];
                    let n = futures_lite::AsyncReadExt::read(&mut stream, &mut buf)
                        .await
                        .unwrap();
                    assert_eq!(n, 1);
                    order.borrow_mut().push("reader");
                })
            };
            // The reader waits on its socket; its poll request reaches the kernel when the
            // executor next polls for I/O, before this sleep ends.
            sleep(Duration::from_millis(5)).await;
            assert!(order.borrow().is_empty());

            // One busy turn of 64 tasks, each making a system call; the first sends the byte
            // the reader waits for. (A spawned task first runs inside its spawner: each yields
            // once so that all of them run from the task queue, in one turn.)
            const BUSY: usize = 64;
            let mut busy = Vec::new();
            for i in 0..BUSY {
                let (order, peer) = (order.clone(), peer.clone());
                busy.push(spawn_local(async move {
                    futures_lite::future::yield_now().await;
                    if i == 0 {
                        peer.borrow_mut().write_all(b"x").unwrap();
                    }
                    std::thread::yield_now();
                    order.borrow_mut().push("busy");
                }));
            }
            for t in busy {
                t.await;
            }
            reader.await;
            let order = order.borrow();
            let at = order.iter().position(|&o| o == "reader").unwrap();
            // Reaped every 8 tasks, the reader runs after about 8 of the busy tasks; without
            // patch 8 it would run after all of them.
            assert!(
                at < BUSY / 2,
                "the reader ran after {at} of {BUSY} busy tasks"
            );
        })
        .unwrap()
        .join()
        .unwrap();
}
