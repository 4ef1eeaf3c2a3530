/*
 * The real test node's sandbox ("pause") image: it holds a pod's namespaces and
 * does nothing else. Sleeps until SIGTERM or SIGINT, then exits 0; reaps
 * children it inherits as PID 1 of a shared PID namespace.
 *
 * The same static binary serves tests as a tiny container that needs no libc or
 * shell in its image. With arguments it acts on them:
 *   pause exit <code>                 exit at once with <code>
 *   pause ignore-term                 ignore SIGTERM (only SIGKILL ends it)
 *   pause term-file <path>            on SIGTERM, write "TERM" to <path>, exit 0
 *   pause alloc <MiB>                 touch <MiB> MiB of memory, then sleep
 *   pause connect <ip> <port> <msg>   send <msg> over TCP, shut down writing,
 *                                     copy the answer to stdout, exit 0
 *                                     (exit 2 if the connection fails)
 *
 * Built static (gcc -static) so the image needs nothing else.
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static const char *term_file;

static void on_stop(int sig) {
    (void)sig;
    if (term_file) {
        int fd = open(term_file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            (void)!write(fd, "TERM\n", 5);
            close(fd);
        }
    }
    stop = 1;
}

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

static int do_connect(const char *ip, const char *port, const char *msg) {
    struct sockaddr_in addr;
    char buf[4096];
    ssize_t n;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(port));
    if (fd < 0 || inet_pton(AF_INET, ip, &addr.sin_addr) != 1 ||
        connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        return 2;
    }
    if (write(fd, msg, strlen(msg)) < 0) {
        perror("write");
        return 2;
    }
    shutdown(fd, SHUT_WR);
    while ((n = read(fd, buf, sizeof buf)) > 0)
        fwrite(buf, 1, (size_t)n, stdout);
    fflush(stdout);
    close(fd);
    return 0;
}

static void do_alloc(long mib) {
    for (long i = 0; i < mib; i++) {
        char *p = malloc(1 << 20);
        if (!p)
            exit(3);
        memset(p, 0x5a, 1 << 20);
    }
    printf("allocated %ld MiB\n", mib);
    fflush(stdout);
}

int main(int argc, char **argv) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    if (argc >= 3 && strcmp(argv[1], "exit") == 0)
        return atoi(argv[2]);
    if (argc >= 5 && strcmp(argv[1], "connect") == 0)
        return do_connect(argv[2], argv[3], argv[4]);
    if (argc >= 3 && strcmp(argv[1], "term-file") == 0)
        term_file = argv[2];
    sa.sa_handler = on_stop;
    sigaction(SIGINT, &sa, NULL);
    if (argc >= 2 && strcmp(argv[1], "ignore-term") == 0)
        sa.sa_handler = SIG_IGN;
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_handler = on_child;
    sa.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    if (argc >= 3 && strcmp(argv[1], "alloc") == 0)
        do_alloc(atol(argv[2]));
    while (!stop)
        pause();
    return 0;
}
