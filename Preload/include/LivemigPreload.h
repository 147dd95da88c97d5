// The preload library for `livemig run` has no public interface: it acts
// through its constructor and by interposing mmap(2). See preload.c.
int livemig_preload_tracking_fd(void);
