//! One reader thread for all the shared-memory links of a node.
//!
//! A server with `W` workers on its host has `W` shared-memory links; with
//! a thread per link reading its ring, `W` threads spin on a machine that
//! may have two cores, beside the workers' own, and each small round waits
//! for its reader's turn on a core. A node's [`Readers`] read every link of
//! the node from one thread instead: it looks at each ring in turn, spins
//! while any may soon hold a frame, and sleeps on all their "data arrived"
//! futex words at once (`futex_waitv`, Linux 5.16). Where the kernel lacks
//! it (or `PSKV_SHM_READERS=link`), each link keeps its own reader thread
//! (`Reader::run`).
//!
//! # States and invariants
//!
//! - A group is open until its thread finds it without members: then, under
//!   the members' lock, it closes and the thread ends; [`Readers::add`]
//!   starts a new group for the next link. So a member is never left in a
//!   group whose thread has ended. A group takes at most `MAX_MEMBERS`
//!   links (`futex_waitv` waits on 128 words, one is the bell): a full
//!   group is left to its links and the next link starts another.
//! - The bell (`Bell`, a private futex word) is rung whenever the thread
//!   must look again without a frame to show for it: a link added or
//!   removed, a poller that leaves its link (see `reader.rs`: the reader of
//!   a polled link stands back while it is polled). The thread snapshots
//!   the members when the bell changed, and waits on the bell's value with
//!   the rings' words, so a ring after the snapshot is never slept through.
//! - Sleeping without lost wake-ups, per ring as in `ring/mod.rs`: read the
//!   ring's sequence word, set its waiting flag, look at every ring it
//!   watches once more, then sleep on all their sequence words with the
//!   values read; a producer that published meanwhile either is seen by
//!   the look or sees the flag and wakes the word (a changed word ends the
//!   sleep at once). Sleeps last at most `WAIT_SLICE`, the nap of a polled
//!   link, or `BUSY_NAP` while a poller holds a ring, so a link's end and
//!   what a poller left are noticed anyway.
//! - A ring counts as unread when the producer's head is past the
//!   consumer's own position (`Reader::wants_reading`; never the peer's
//!   tail) and no poller holds it; one look reads at most
//!   `FRAMES_PER_LOOK` frames of it, then the next ring's turn comes.
//! - A link ends on its group's thread exactly as on its own thread:
//!   what the ring holds is delivered, then its `finish` (ends the link,
//!   closes the ring) runs once. Subtle: if a frame's handling panics, the
//!   thread's guard ends every link the group still has, as a dying
//!   per-link reader ends its one.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::futex::{self, Waitv};
use super::reader::{Reader, Wake};
use super::ring::WAIT_SLICE;
use crate::spin::Spin;
use crate::van::VanError;

/// Links per group: `futex_waitv` takes 128 words, one of them the bell.
const MAX_MEMBERS: usize = 127;

/// Frames read from one ring before the thread looks at the next, so a
/// busy link does not hold up the others.
const FRAMES_PER_LOOK: usize = 64;

/// The longest sleep while a poller holds a ring's consumer: what it
/// leaves unread when it lets go is not announced by a futex wake.
const BUSY_NAP: Duration = Duration::from_millis(1);

/// What ends a link once its reading has ended, with why.
pub(super) type Finish = Box<dyn FnOnce(VanError) + Send>;

/// A private futex word that makes a group's thread look again.
pub(crate) struct Bell {
    word: AtomicU32,
}

impl Bell {
    /// Makes the thread look again (wakes it if it sleeps).
    pub(crate) fn ring(&self) {
        self.word.fetch_add(1, Ordering::SeqCst);
        futex::wake_private(&self.word);
    }
}

struct Member {
    reader: Arc<Reader>,
    finish: Mutex<Option<Finish>>,
}

impl Member {
    /// Stops reading (what the ring holds delivered first) and ends the
    /// link, once.
    fn end(&self, why: VanError) {
        let why = self.reader.stop(why);
        self.finish(why);
    }

    fn finish(&self, why: VanError) {
        if let Some(f) = self.finish.lock().take() {
            f(why);
        }
    }
}

struct Members {
    list: Vec<Arc<Member>>,
    /// The thread has ended (or is ending): no member may join.
    closed: bool,
}

/// One thread reading several links.
struct Group {
    members: Mutex<Members>,
    bell: Arc<Bell>,
}

/// The readers of a node's shared-memory links (one per postoffice).
#[derive(Default)]
pub(crate) struct Readers {
    group: Mutex<Option<Arc<Group>>>,
}

impl Readers {
    /// Whether the kernel lets a node's links be read by one thread
    /// (`futex_waitv`); else each link gets a thread of its own.
    pub(super) fn grouped() -> bool {
        futex::waitv_works()
    }

    /// Reads `reader`'s ring on the node's group thread from now on;
    /// `finish` ends its link once the reading ends.
    pub(super) fn add(&self, reader: Arc<Reader>, finish: Finish) -> std::io::Result<()> {
        let member = Arc::new(Member {
            reader,
            finish: Mutex::new(Some(finish)),
        });
        let mut slot = self.group.lock();
        if let Some(g) = &*slot {
            let mut m = g.members.lock();
            if !m.closed && m.list.len() < MAX_MEMBERS {
                member.reader.set_wake(Wake::Group(g.bell.clone()));
                m.list.push(member);
                drop(m);
                g.bell.ring();
                return Ok(());
            }
        }
        let g = Arc::new(Group {
            members: Mutex::new(Members {
                list: vec![member.clone()],
                closed: false,
            }),
            bell: Arc::new(Bell {
                word: AtomicU32::new(0),
            }),
        });
        member.reader.set_wake(Wake::Group(g.bell.clone()));
        let run = g.clone();
        std::thread::Builder::new()
            .name("pskv-shm-rx".into())
            .spawn(move || run.run())?;
        *slot = Some(g);
        Ok(())
    }
}

/// Ends every link a group still has when its thread ends, however it ends.
struct EndAll<'a>(&'a Group);

impl Drop for EndAll<'_> {
    fn drop(&mut self) {
        let left = {
            let mut m = self.0.members.lock();
            m.closed = true;
            std::mem::take(&mut m.list)
        };
        // Subtle: nothing more is delivered on any of them before the
        // first link's end runs its callbacks (the thread may be unwinding
        // from a frame's handler: no handler runs again).
        for m in &left {
            m.reader.halt();
        }
        for m in left {
            m.finish(VanError::Closed("the shared-memory reader stopped"));
        }
    }
}

impl Group {
    fn run(&self) {
        let _end_all = EndAll(self);
        let mut spin = Spin::new();
        let mut members: Vec<Arc<Member>> = Vec::new();
        // The bell's value when `members` was taken.
        let mut taken: Option<u32> = None;
        loop {
            let bell = self.bell.word.load(Ordering::SeqCst);
            if taken != Some(bell) {
                let mut m = self.members.lock();
                if m.list.is_empty() {
                    // Subtle: closed under the lock `add` takes, so no
                    // link joins a group whose thread is gone.
                    m.closed = true;
                    return;
                }
                members = m.list.clone();
                taken = Some(bell);
            }
            let mut ended = false;
            for m in &members {
                if m.reader.polled_recently() && !m.reader.gone() {
                    continue;
                }
                if let Err(e) = m.reader.step(FRAMES_PER_LOOK) {
                    self.remove(m, e);
                    ended = true;
                }
            }
            if ended {
                continue;
            }
            let ready = || self.look_again(&members, bell);
            if members.iter().all(|m| m.reader.polled_recently()) {
                // Every link is polled: nothing to spin for, nap.
                self.sleep(&members, bell);
                continue;
            }
            spin.wait(&ready, &mut || {
                self.sleep(&members, bell);
                false
            });
        }
    }

    /// Whether the thread has something to look at: the bell rang since
    /// `bell`, or a ring nobody polls wants reading.
    fn look_again(&self, members: &[Arc<Member>], bell: u32) -> bool {
        self.bell.word.load(Ordering::SeqCst) != bell
            || members
                .iter()
                .any(|m| !m.reader.polled_recently() && m.reader.wants_reading())
    }

    /// Ends `m`'s link and takes it out of the group.
    fn remove(&self, m: &Arc<Member>, why: VanError) {
        m.end(why);
        self.members.lock().list.retain(|x| !Arc::ptr_eq(x, m));
        self.bell.word.fetch_add(1, Ordering::SeqCst);
    }

    /// Sleeps until a ring not polled gets a frame or ends, the bell rings,
    /// a polled ring's nap ends, or `WAIT_SLICE` passes.
    fn sleep(&self, members: &[Arc<Member>], bell: u32) {
        let mut words = Vec::with_capacity(members.len() + 1);
        words.push(Waitv::private(&self.bell.word, bell));
        let mut timeout = WAIT_SLICE;
        let mut watched = Vec::with_capacity(members.len());
        for m in members {
            if let Some(nap) = m.reader.nap_left() {
                timeout = timeout.min(nap);
                continue;
            }
            let (seq, flag) = m.reader.ring().data_wait();
            let seen = seq.load(Ordering::SeqCst);
            flag.store(1, Ordering::SeqCst);
            words.push(Waitv::shared(seq, seen));
            watched.push(flag);
        }
        // The flags before the look at the rings' indices (the ring's wait
        // protocol, `ring/mod.rs`).
        fence(Ordering::SeqCst);
        let ready = self.look_again(members, bell);
        for m in members {
            // A ring polled since it joined the wait is not watched by
            // anyone else: wake when its poll is stale. A ring a poller holds
            // may be left unread without a wake.
            if let Some(nap) = m.reader.nap_left() {
                timeout = timeout.min(nap);
            }
            if m.reader.busy() {
                timeout = timeout.min(BUSY_NAP);
            }
        }
        if !ready {
            futex::wait_any(&words, timeout);
        }
        for flag in watched {
            flag.store(0, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::thread::ThreadId;
    use std::time::Instant;

    use bytes::Bytes;
    use parking_lot::Condvar;

    use super::super::ring::{Consumer, Producer, Ring};
    use super::*;
    use crate::link::Link;
    use crate::van::{end, FrameSink};
    use crate::wire::{Frame, Kind, Limits, VanId};

    /// What the sink saw.
    #[derive(Default)]
    struct Seen {
        /// The keys of each link's frames, in delivery order.
        keys: HashMap<u64, Vec<u64>>,
        /// The thread that delivered each frame.
        threads: Vec<ThreadId>,
        /// Why each link ended.
        ended: HashMap<u64, String>,
    }

    /// Records what was delivered; a frame of key `PANIC` panics.
    #[derive(Default)]
    struct Record {
        seen: Mutex<Seen>,
        cv: Condvar,
    }

    const PANIC: u64 = 999;

    impl FrameSink for Record {
        fn on_frame(&self, link: &Arc<Link>, frame: Frame) {
            if frame.keys[0] == PANIC {
                panic!("a frame's handler panics (on purpose)");
            }
            let mut s = self.seen.lock();
            s.keys.entry(link.id).or_default().push(frame.keys[0]);
            s.threads.push(std::thread::current().id());
            self.cv.notify_all();
        }
        fn on_closed(&self, link: &Arc<Link>, reason: String) {
            self.seen.lock().ended.insert(link.id, reason);
            self.cv.notify_all();
        }
    }

    impl Record {
        /// Waits (at most 10 s) until `done` holds of what was seen.
        fn until(&self, what: &str, done: impl Fn(&Seen) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut s = self.seen.lock();
            while !done(&s) {
                assert!(
                    !self.cv.wait_until(&mut s, deadline).timed_out(),
                    "timed out waiting for {what}"
                );
            }
        }
    }

    /// A link whose ring the node's readers read: its producer end, its
    /// ring and the link.
    fn link(readers: &Readers, sink: &Arc<Record>, id: u64) -> (Producer, Arc<Ring>, Arc<Link>) {
        let (p, r, l, _) = polled_link(readers, sink, id);
        (p, r, l)
    }

    /// As [`link`], with the reader a waiting thread may poll.
    fn polled_link(
        readers: &Readers,
        sink: &Arc<Record>,
        id: u64,
    ) -> (Producer, Arc<Ring>, Arc<Link>, Arc<Reader>) {
        let (path, _) = super::super::ring_paths();
        let w = Ring::create(&path, 1 << 16, 0).unwrap();
        let r = Arc::new(Ring::open(&path, 1 << 16).unwrap());
        std::fs::remove_file(&path).unwrap();
        let link = Arc::new(Link::new(id, 0, VanId::Shm));
        let sink: Arc<dyn FrameSink> = sink.clone();
        let reader = Arc::new(Reader::new(
            Consumer::new(r.clone(), 1 << 20),
            r.clone(),
            link.clone(),
            sink.clone(),
            Limits::default(),
        ));
        let (l, rr) = (link.clone(), r.clone());
        readers
            .add(
                reader.clone(),
                Box::new(move |e| {
                    end(&l, &sink, e.to_string());
                    rr.close();
                }),
            )
            .unwrap();
        (Producer::new(Arc::new(w)), r, link, reader)
    }

    fn frame(key: u64) -> Frame {
        let mut f = Frame::new(Kind::Request);
        f.keys = vec![key];
        f.lens = vec![4];
        f.payload = Bytes::from(key.to_le_bytes()[..4].to_vec());
        f
    }

    /// Three links of a node are read by one thread, each link's frames
    /// in order; a link whose peer is gone ends alone (what it sent first
    /// still delivered) while the others flow; once the last ends the
    /// thread ends, and the next link gets a new one.
    #[test]
    fn one_thread_reads_every_link_of_a_node_and_each_ends_alone() {
        if !Readers::grouped() {
            eprintln!("this kernel has no futex_waitv: links get a reader thread each");
            return;
        }
        let (readers, sink) = (Readers::default(), Arc::new(Record::default()));
        let mut links: Vec<_> = (0..3).map(|i| link(&readers, &sink, i)).collect();
        let senders: Vec<_> = links
            .drain(..)
            .map(|(mut p, r, l)| {
                std::thread::spawn(move || {
                    for k in 0..200 {
                        p.frame(&frame(k), &|| false).unwrap();
                    }
                    (p, r, l)
                })
            })
            .collect();
        let mut links: Vec<_> = senders.into_iter().map(|t| t.join().unwrap()).collect();
        sink.until("600 frames", |s| s.threads.len() == 600);
        {
            let s = sink.seen.lock();
            for id in 0..3 {
                assert_eq!(s.keys[&id], (0..200).collect::<Vec<_>>(), "link {id}");
            }
            let first = s.threads[0];
            assert!(
                s.threads.iter().all(|t| *t == first),
                "one thread reads them all"
            );
            assert_ne!(first, std::thread::current().id());
        }
        // Link 1's peer sends one more frame and goes: the frame is still
        // delivered, then the link ends; the others still flow.
        links[1].0.frame(&frame(500), &|| false).unwrap();
        links[1].1.close();
        sink.until("link 1's end", |s| s.ended.contains_key(&1));
        assert_eq!(sink.seen.lock().keys[&1].last(), Some(&500));
        assert!(links[1].2.is_closed());
        for i in [0, 2] {
            links[i].0.frame(&frame(300), &|| false).unwrap();
        }
        sink.until("frames after link 1's end", |s| {
            s.keys[&0].last() == Some(&300) && s.keys[&2].last() == Some(&300)
        });
        assert_eq!(sink.seen.lock().ended.len(), 1, "only link 1 ended");
        // A link that ends on this side (not its peer) ends too.
        end(
            &links[0].2,
            &(sink.clone() as Arc<dyn FrameSink>),
            "left".into(),
        );
        links[2].1.close();
        sink.until("every link's end", |s| s.ended.len() == 3);
        // The group empties and its thread ends; a new link starts another.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !readers.group.lock().as_ref().unwrap().members.lock().closed {
            assert!(
                Instant::now() < deadline,
                "the empty group's thread did not end"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let (mut p, _r, _l) = link(&readers, &sink, 7);
        p.frame(&frame(1), &|| false).unwrap();
        sink.until("the new link's frame", |s| s.keys.contains_key(&7));
        {
            let s = sink.seen.lock();
            assert_ne!(
                s.threads.last(),
                s.threads.first(),
                "a new thread reads the new link"
            );
        }
        // A sleeping reader wakes for a frame (its sleeps last 100 ms when
        // nothing wakes it: a missed wake-up shows as about 80 ms a frame).
        for k in 2..12 {
            std::thread::sleep(Duration::from_millis(20));
            let sent = Instant::now();
            p.frame(&frame(k), &|| false).unwrap();
            sink.until("a frame to a sleeping reader", |s| {
                s.keys[&7].last() == Some(&k)
            });
            let took = sent.elapsed();
            assert!(took < Duration::from_millis(60), "frame {k} took {took:?}");
        }
    }

    /// A thread that polls a link reads its frames itself while the
    /// group's thread stands back; once it leaves, the group's thread reads
    /// again at once. Every frame is delivered once, in order, whoever
    /// reads.
    #[test]
    fn a_polling_thread_and_the_group_share_a_link() {
        use crate::van::shm::Poll;
        if !Readers::grouped() {
            eprintln!("this kernel has no futex_waitv: links get a reader thread each");
            return;
        }
        let (readers, sink) = (Readers::default(), Arc::new(Record::default()));
        let (mut p, _r, _l, reader) = polled_link(&readers, &sink, 0);
        // Another link keeps the group's thread busy meanwhile.
        let (mut q, _r2, _l2) = link(&readers, &sink, 1);
        let me = std::thread::current().id();
        for k in 0..50 {
            reader.poll();
            p.frame(&frame(k), &|| false).unwrap();
            q.frame(&frame(k), &|| false).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while sink.seen.lock().keys.get(&0).map_or(0, |v| v.len()) <= k as usize {
                reader.poll();
                assert!(Instant::now() < deadline, "frame {k} was not delivered");
            }
        }
        reader.leave();
        for k in 50..60 {
            p.frame(&frame(k), &|| false).unwrap();
        }
        sink.until("the frames after the poller left", |s| {
            s.keys[&0].len() == 60
        });
        sink.until("the other link's frames", |s| {
            s.keys.get(&1).map_or(0, |v| v.len()) == 50
        });
        let s = sink.seen.lock();
        assert_eq!(s.keys[&0], (0..60).collect::<Vec<_>>());
        assert!(s.threads.contains(&me), "the poller read nothing");
        assert!(
            s.threads.iter().any(|t| *t != me),
            "the group's thread read nothing"
        );
        assert!(s.ended.is_empty());
    }

    /// A frame's handler that panics ends the thread, and with it every
    /// link it read, as a dying reader of one link ends that link.
    #[test]
    fn a_panicking_handler_ends_every_link_of_its_thread() {
        if !Readers::grouped() {
            eprintln!("this kernel has no futex_waitv: links get a reader thread each");
            return;
        }
        let (readers, sink) = (Readers::default(), Arc::new(Record::default()));
        let (mut p0, _r0, l0) = link(&readers, &sink, 0);
        let (_p1, _r1, l1) = link(&readers, &sink, 1);
        p0.frame(&frame(PANIC), &|| false).unwrap();
        sink.until("both links' end", |s| s.ended.len() == 2);
        assert!(l0.is_closed() && l1.is_closed());
        let s = sink.seen.lock();
        assert!(s.ended[&1].contains("reader stopped"), "{:?}", s.ended);
    }
}
