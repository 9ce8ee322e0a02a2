/*
 * One process, four threads, four sockets: each thread creates its own
 * socket, sets SO_REUSEPORT, binds the shared port (PORT, default 8080) on
 * 0.0.0.0, listens and accepts in a loop, as the SO_REUSEPORT article's C
 * example does. Each answer names the pid and the thread ("shard=1T" for
 * thread T, so that the netns tests tell the sockets apart). A thread whose
 * accept() fails (its socket was shut down) ends; the process ends with its
 * last thread.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define THREADS 4

static int port = 8080;

static void *serve(void *arg)
{
	long t = (long)arg;
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in addr;
	char body[128], answer[256], request[4096];
	int len;

	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_port = htons(port);
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	if (fd < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0 ||
	    bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 ||
	    listen(fd, 128) != 0) {
		perror("socket");
		exit(1);
	}
	snprintf(body, sizeof(body), "portfleet listener=threads shard=1%ld pid=%d\n",
		 t, (int)getpid());
	len = snprintf(answer, sizeof(answer),
		       "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n"
		       "Connection: close\r\n\r\n%s",
		       strlen(body), body);
	for (;;) {
		int c = accept(fd, NULL, NULL);
		size_t got = 0;

		if (c < 0)
			return NULL;
		while (got < sizeof(request) - 1) {
			ssize_t n = read(c, request + got, sizeof(request) - 1 - got);

			if (n <= 0)
				break;
			got += (size_t)n;
			request[got] = '\0';
			if (strstr(request, "\r\n\r\n"))
				break;
		}
		if (write(c, answer, (size_t)len) < 0)
			perror("write");
		close(c);
	}
}

int main(void)
{
	pthread_t threads[THREADS];
	const char *p = getenv("PORT");
	long t;

	if (p)
		port = atoi(p);
	for (t = 0; t < THREADS; t++)
		pthread_create(&threads[t], NULL, serve, (void *)t);
	for (t = 0; t < THREADS; t++)
		pthread_join(threads[t], NULL);
	return 0;
}
