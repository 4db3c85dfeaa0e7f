//! A store that misbehaves on purpose, for tests of the logic above
//! storage (repository operations, the asynchronous archiver) without a
//! server: [`Faulty`] wraps any `object_store` store, usually an in-memory
//! one ([`Store::memory`](super::Store::memory)), and for the keys a rule
//! names fails, panics or delays the operation. Rules change while the
//! store is in use, which is how a test takes a repository down and up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult,
};

/// The kind of operation a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Writes (whole and multipart) and copies.
    Put,
    /// Reads.
    Get,
    /// Lists.
    List,
    /// Deletes.
    Delete,
    /// Every operation.
    Any,
}

/// What a rule does.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The operation fails with a store error (as a server that does not
    /// answer would, after its retries).
    Fail,
    /// The task doing the operation panics.
    Panic,
    /// The operation waits this long, then proceeds.
    Delay(Duration),
}

/// One rule: `fault` for operations `op` on keys containing `key`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Which operations.
    pub op: Op,
    /// Part of the key (relative to the wrapped store's root); empty
    /// matches every key.
    pub key: String,
    /// What happens.
    pub fault: Fault,
}

impl Rule {
    /// A rule for `op` on keys containing `key`.
    pub fn new(op: Op, key: &str, fault: Fault) -> Rule {
        Rule { op, key: key.to_owned(), fault }
    }
}

/// A store that applies [`Rule`]s before passing each operation on.
#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn ObjectStore>,
    rules: Mutex<Vec<Rule>>,
}

impl Faulty {
    /// Wraps `inner`, with no rule yet.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<Faulty> {
        Arc::new(Faulty { inner, rules: Mutex::new(Vec::new()) })
    }

    /// Replaces the rules.
    pub fn set(&self, rules: Vec<Rule>) {
        *self.rules.lock().expect("rules") = rules;
    }

    /// Removes every rule: the store behaves again.
    pub fn clear(&self) {
        self.set(Vec::new());
    }

    fn fault(&self, op: Op, key: &str) -> Option<Fault> {
        let rules = self.rules.lock().expect("rules");
        rules.iter().find(|r| (r.op == op || r.op == Op::Any) && key.contains(&r.key)).map(|r| r.fault.clone())
    }

    async fn check(&self, op: Op, key: &str) -> object_store::Result<()> {
        apply(self.fault(op, key), op, key).await
    }
}

async fn apply(fault: Option<Fault>, op: Op, key: &str) -> object_store::Result<()> {
    match fault {
        None => Ok(()),
        Some(Fault::Fail) => {
            Err(object_store::Error::Generic { store: "faulty", source: format!("injected {op:?} failure at '{key}'").into() })
        }
        Some(Fault::Panic) => panic!("injected {op:?} panic at '{key}'"),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
    }
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        self.check(Op::Put, location.as_ref()).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check(Op::Put, location.as_ref()).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.check(Op::Get, location.as_ref()).await?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        let rules = self.rules.lock().expect("rules").clone();
        let checked = locations
            .and_then(move |p| {
                let fault =
                    rules.iter().find(|r| (r.op == Op::Delete || r.op == Op::Any) && p.as_ref().contains(&r.key)).map(|r| r.fault.clone());
                async move { apply(fault, Op::Delete, p.as_ref()).await.map(|()| p) }
            })
            .boxed();
        self.inner.delete_stream(checked)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let key = prefix.map(|p| p.as_ref().to_owned()).unwrap_or_default();
        let fault = self.fault(Op::List, &key);
        let inner = self.inner.list(prefix);
        futures::stream::once(async move { apply(fault, Op::List, &key).await.map(|()| inner) }).try_flatten().boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.check(Op::List, prefix.map(|p| p.as_ref()).unwrap_or("")).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.check(Op::Put, to.as_ref()).await?;
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Store;

    #[tokio::test(start_paused = true)]
    async fn rules_fail_and_delay_what_they_name_and_nothing_else() {
        let faulty = Faulty::new(Arc::new(object_store::memory::InMemory::new()));
        let store = Store::from_object_store(faulty.clone(), "faulty://");
        store.put("a/1", "one".into(), false).await.unwrap();
        faulty.set(vec![Rule::new(Op::Put, "a/", Fault::Fail), Rule::new(Op::List, "", Fault::Fail)]);
        let e = store.put("a/2", "two".into(), false).await.unwrap_err();
        assert!(e.retryable() && e.to_string().contains("injected Put failure"), "{e}");
        store.put("b/1", "other".into(), false).await.unwrap();
        assert!(store.list("a").await.is_err());
        assert_eq!(store.get("a/1").await.unwrap().unwrap(), "one");
        faulty.clear();
        assert_eq!(store.list("").await.unwrap().len(), 2);
        faulty.set(vec![Rule::new(Op::Get, "a/1", Fault::Delay(Duration::from_millis(50)))]);
        let t = tokio::time::Instant::now();
        store.get("a/1").await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(50), "the paused clock moved by the delay");
    }
}
