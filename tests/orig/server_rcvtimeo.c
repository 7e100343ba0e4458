/*
 * fastlive: reconstruction of the article's section 5 server (SO_RCVTIMEO / SO_SNDTIMEO).
 *
 * The article's copy lost every line that held only "{" or "}"; the braces
 * are put back, nothing else of the program is changed, except:
 *
 * DELIBERATE CHANGE: the listening address and port come from argv[1] /
 * argv[2], else from $FL_ARTICLE_HOST / $FL_ARTICLE_PORT, else
 * 127.0.0.1 / 8888.  The article hard-codes SERVER_IP_ADDR
 * "192.168.1.111", which this project never uses.
 *
 * Every printf is byte for byte the article's (trailing spaces, "\r\n" and
 * Chinese strings included).
 *
 * Where the reconstruction had to choose (all servers):
 *   - main() ends with the endless accept loop: the article shows no
 *     "return 0;" after it (a non-brace line would have survived).
 *   - The child never leaves its loop (every return is commented out), so it
 *     never reaches an exit(); the parent never reaps children (no SIGCHLD
 *     handler, no waitpid): faithful, and zombies accumulate.
 *   - "/ * 释放资源 * /" after sig_pipe's printf is taken as a comment inside
 *     sig_pipe.  No effect on behaviour.
 *   - The empty "if((strlen(buffer)+1)==size) { }else { ... }": the if branch
 *     held only braces (nothing else survived between the if and "}else").
 *   - The read check closes its "}else { printf(recv data) }" before the
 *     memset: the reply "I am server" is written on EVERY iteration, also
 *     after read() returned 0 or -1 (as in the book template the code comes
 *     from, where the reply follows the read unconditionally).  That is what
 *     lets the server see EPIPE/SIGPIPE after the peer is gone.
 *
 * This file: server_tcp.c with process_conn_server replaced by the one of
 * section 5 (10.2 s receive and send timeouts, then the section-1 loop).
 * The loop body is reconstructed as in server_tcp.c.
 */
/************************************************************
*FileName: 01_server_tcp.c
*BlogAddr: caibiao-lee.blog.csdn.net
*Description: TCP 客户端收发数据
*Date: 2020-01-04
*Author: Caibiao Lee
*Version: V1.0
*Others:
通过read write 函数的返回值和错误码判断对方连接是否已经断开
*History:
***********************************************************/
#include <sys/uio.h>
#include <string.h>
#include <stdlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <signal.h>
#include <errno.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>

#define SERVER_IP_ADDR "127.0.0.1" /* fastlive: the article's 192.168.1.111 is never used */
#define PORT 8888 /* 侦听端口地址 */
#define BACKLOG 2 /* 侦听队列长度 */

void sig_proccess(int signo)
{
    printf("Catch a exit signal\n");
    exit(0);
}

void sig_pipe(int sign)
{
    printf("Catch a SIGPIPE signal\n");
    /* 释放资源 */
}

/********************************************************
Function: process_conn_server
Description: 通过设置收发操作判断对方连接已经断开了
Input: s32SocketFd :服务端接收到客户端连接的ID;
OutPut: none
Return: 0: success,none 0:error
Others:
Author: Caibiao Lee
Date: 2020-01-04
*********************************************************/
void process_conn_server(int s32SocketFd)
{
    int size = 0;
    char buffer[1024]; /* 数据的缓冲区 */
    int optlen = -1; /* 整型的选项类型值 */
    int l_s32Ret = 0;

    /* 设置发送和接收超时时间 */
    struct timeval tv;
    tv.tv_sec = 10; /* 1秒 */
    tv.tv_usec = 200000;/* 200ms */
    optlen = sizeof(tv);
    l_s32Ret = setsockopt(s32SocketFd, SOL_SOCKET, SO_RCVTIMEO, &tv, optlen); /* 设置接收超时时间 */
    if(l_s32Ret == -1){/* 设置接收超时时间失败 */
        printf("设置接收超时时间失败\n");
    }

    l_s32Ret = setsockopt(s32SocketFd, SOL_SOCKET, SO_SNDTIMEO, &tv, optlen);/* 设置发送超时时间 */
    if(l_s32Ret == -1){
        printf("设置发送超时时间失败\n");
    }

    for(;;)
    {
        /* 从套接字中读取数据放到缓冲区buffer中 */
        size = read(s32SocketFd, buffer, 1024);
        if(size==0)
        {/* 没有数据 */
            printf("read size = %d, error %d \n",size,errno);
            //return;
        }else if(size<0)
        {
            printf("read size = %d, error %d \n",size,errno);
            //return ;
        }else
        {
            printf("recv data:%s \n",buffer);
        }

        memset(buffer,0,sizeof(buffer));
        /* 构建响应字符,为接收到客户端字节的数量 */
        strcpy(buffer,"I am server");
        size = write(s32SocketFd, buffer, strlen(buffer)+1);/* 发给客户端 */
        if((strlen(buffer)+1)==size)
        {
        }else
        {
            printf("write data error size = %d, errno=%d\n",size,errno);
            //return ;
        }
        sleep(1);
    }
}

int main(int argc, char *argv[])
{
    int l_s32ServerFd = -1;
    int l_s32ClientrFd = -1;
    struct sockaddr_in server_addr; /* 服务器地址结构 */
    struct sockaddr_in client_addr; /* 客户端地址结构 */
    int l_s32Ret = 0; /* 返回值 */
    pid_t pid; /* 分叉的进行id */

    /* fastlive: address and port from argv / environment (see the top) */
    const char *l_pcHost = argc > 1 ? argv[1] : getenv("FL_ARTICLE_HOST");
    const char *l_pcPort = argc > 2 ? argv[2] : getenv("FL_ARTICLE_PORT");
    if(l_pcHost == NULL) l_pcHost = SERVER_IP_ADDR;

    signal(SIGINT, sig_proccess);
    signal(SIGPIPE, sig_pipe);

    /* 建立一个流式套接字 */
    l_s32ServerFd = socket(AF_INET, SOCK_STREAM, 0);
    if(l_s32ServerFd < 0)
    {/* 出错 */
        printf("socket error\n");
        return -1;
    }

    /* 设置服务器地址 */
    bzero(&server_addr, sizeof(server_addr)); /* 清0 */
    server_addr.sin_family = AF_INET; /* 协议族 */
    server_addr.sin_addr.s_addr = inet_addr(l_pcHost);/*服务器IP地址*/
    server_addr.sin_port = htons(l_pcPort ? atoi(l_pcPort) : PORT); /* 服务器端口 */

    /*设置IP地址可以重复绑定*/
    int l_s32UseAddr = 1;
    if(setsockopt(l_s32ServerFd, SOL_SOCKET, SO_REUSEADDR, &l_s32UseAddr, sizeof(int)) < 0)
    {
        printf("%s %d\tsetsockopt error! Error code: %d,Error message: %s\n",
                __FUNCTION__, __LINE__, errno, strerror(errno));
        return -2;
    }

    /* 绑定地址结构到套接字描述符 */
    l_s32Ret = bind(l_s32ServerFd, (struct sockaddr*)&server_addr, sizeof(server_addr));
    if(l_s32Ret < 0)
    {/* 出错 */
        printf("bind error\n");
        return -1;
    }

    /* 设置侦听 */
    l_s32Ret = listen(l_s32ServerFd, BACKLOG);
    if(l_s32Ret < 0)
    {/* 出错 */
        printf("listen error\n");
        return -1;
    }

    /* 主循环过程 */
    for(;;)
    {
        int addrlen = sizeof(struct sockaddr);
        /* 接收客户端连接 */
        l_s32ClientrFd = accept(l_s32ServerFd, (struct sockaddr*)&client_addr, &addrlen);
        if(l_s32ClientrFd < 0)
        { /* 出错 */
            continue; /* 结束本次循环 */
        }

        /* 建立一个新的进程处理到来的连接 */
        pid = fork(); /* 分叉进程 */
        if( pid == 0 )
        { /* 子进程中 */
            close(l_s32ServerFd); /* 在子进程中关闭服务器的侦听 */
            process_conn_server(l_s32ClientrFd);/* 处理连接 */
        }else
        {
            close(l_s32ClientrFd); /* 在父进程中关闭客户端的连接 */
        }
    }
}
