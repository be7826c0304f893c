/*
 * vsp-resume: run by the guest init of a VM restored from a snapshot (drivers/qemu/snapshot.ts). Reads the
 * host's start message, one line of space-separated vsp.<key>=<value> words, from the control port given
 * as first argument, once it has printed its second argument on stderr (the ready line: from then on the
 * port is open and raw, so no byte the host sends is lost to the UART's reset at open); sets the clock from vsp.time=<seconds>.<nanoseconds> (the snapshot's clock is the build's);
 * credits vsp.seed=<hex> to the kernel's entropy pool and reseeds its CRNG at once (until its next timed
 * reseed, every guest restored from one snapshot would otherwise draw the same random bytes); prints the
 * other words, one a line, for the init. Busybox can do neither clock_settime with nanoseconds nor these
 * ioctls, hence this helper.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE 4096
#define MAX_SEED 512

static int die(const char *what) {
  fprintf(stderr, "vsp-resume: %s: %s\n", what, errno ? strerror(errno) : "invalid");
  return 1;
}

static int hex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

static int set_clock(const char *v) {
  char *end;
  errno = 0;
  struct timespec ts = {.tv_sec = strtoll(v, &end, 10)};
  if (*end != '.' || errno) return die("vsp.time");
  ts.tv_nsec = strtol(end + 1, &end, 10);
  if (*end || errno || ts.tv_nsec < 0 || ts.tv_nsec > 999999999) return die("vsp.time");
  return clock_settime(CLOCK_REALTIME, &ts) ? die("clock_settime") : 0;
}

static int reseed(const char *v) {
  size_t n = strlen(v) / 2;
  if (n == 0 || n > MAX_SEED || strlen(v) % 2) return die("vsp.seed");
  struct {
    struct rand_pool_info info;
    unsigned char buf[MAX_SEED];
  } e = {.info = {.entropy_count = (int)n * 8, .buf_size = (int)n}};
  for (size_t i = 0; i < n; i++) {
    int hi = hex(v[2 * i]), lo = hex(v[2 * i + 1]);
    if (hi < 0 || lo < 0) return die("vsp.seed");
    e.buf[i] = (unsigned char)(hi * 16 + lo);
  }
  int fd = open("/dev/urandom", O_WRONLY);
  if (fd < 0) return die("/dev/urandom");
  if (ioctl(fd, RNDADDENTROPY, &e.info)) return die("RNDADDENTROPY");
  if (ioctl(fd, RNDRESEEDCRNG)) return die("RNDRESEEDCRNG");
  return close(fd);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: vsp-resume <control port> <ready line>\n");
    return 2;
  }
  int fd = open(argv[1], O_RDWR | O_NOCTTY);
  if (fd < 0) return die(argv[1]);
  struct termios t;
  if (tcgetattr(fd, &t)) return die("tcgetattr");
  cfmakeraw(&t);
  if (tcsetattr(fd, TCSANOW, &t)) return die("tcsetattr");
  fprintf(stderr, "%s\n", argv[2]);
  char line[MAX_LINE];
  size_t n = 0;
  for (;;) {
    ssize_t r = read(fd, line + n, 1);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return die("reading the start message");
    if (line[n] == '\n') break;
    if (++n == MAX_LINE) return errno = 0, die("start message too long");
  }
  line[n] = 0;
  close(fd);
  for (char *w = strtok(line, " \r"); w; w = strtok(NULL, " \r")) {
    if (!strncmp(w, "vsp.time=", 9)) {
      if (set_clock(w + 9)) return 1;
    } else if (!strncmp(w, "vsp.seed=", 9)) {
      if (reseed(w + 9)) return 1;
    } else {
      puts(w);
    }
  }
  return 0;
}
